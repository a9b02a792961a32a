//! Wiring for `waymark run`: configuration, journeys, topics, the metrics endpoint, signals, and
//! the processing thread. Returns the process exit code on failure.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{error, info};

use crate::config;
use crate::journey::load_dir;
use crate::metrics::{self, Metrics};

/// Runs the service; `Err(code)` says how the process should exit.
pub fn run(config_file: Option<&Path>, overrides: &[(&str, toml::Value)]) -> Result<(), u8> {
    // std::env::vars() panics on a variable that is not UTF-8: read them as OS strings, refuse a
    // WAYMARK_* one with a message, and leave every other variable alone.
    let mut env = Vec::new();
    for (k, v) in std::env::vars_os() {
        match (k.into_string(), v.into_string()) {
            (Ok(k), Ok(v)) => env.push((k, v)),
            (Ok(k), Err(_)) if k.starts_with("WAYMARK_") => {
                eprintln!(
                    "waymark run: environment variable {k} is not valid UTF-8; fix or unset it"
                );
                return Err(2);
            }
            _ => {}
        }
    }
    let cfg = match config::load(config_file, env, overrides) {
        Ok(c) => c,
        Err(e) => {
            eprint!("waymark run: {e}");
            return Err(2);
        }
    };
    match cfg.client_properties() {
        Ok(props) => {
            if !props.common.is_empty() || !props.consumer.is_empty() || !props.producer.is_empty()
            {
                // Names only: values (passwords, keys) are never logged.
                info!(properties = ?props, "kafka client properties set");
            }
            crate::kafka::set_client_properties(props);
        }
        Err(e) => {
            eprint!("waymark run: {e}");
            return Err(2);
        }
    }
    let journeys = match load_dir(&cfg.journeys.dir) {
        Ok(j) => Arc::new(j),
        Err(e) => {
            eprint!("waymark run: refusing to start: {e}");
            return Err(2);
        }
    };
    info!(journeys = journeys.len(), dir = %cfg.journeys.dir.display(), "journeys loaded");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("waymark run: cannot start the runtime: {e}");
            return Err(1);
        }
    };
    rt.block_on(async move {
        let partitions = match crate::kafka::prepare_topics(&cfg).await {
            Ok(n) => n,
            Err(e) => {
                error!("{e:#}");
                eprintln!("waymark run: {e:#}");
                return Err(1);
            }
        };
        let metrics = Metrics::new();
        let shutdown = Arc::new(AtomicBool::new(false));
        let addr = cfg.metrics.addr.parse().expect("checked by config");
        let (stop_http_tx, stop_http_rx) = tokio::sync::oneshot::channel::<()>();
        let server = {
            let m = metrics.clone();
            tokio::spawn(async move {
                let r = metrics::serve(addr, m, async {
                    let _ = stop_http_rx.await;
                })
                .await;
                if let Err(e) = r {
                    error!("metrics endpoint on {addr}: {e}");
                }
            })
        };
        let reload = Arc::new(AtomicBool::new(false));
        {
            let reload = reload.clone();
            tokio::spawn(async move {
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                        .expect("SIGHUP handler");
                while hup.recv().await.is_some() {
                    info!("SIGHUP: reloading the journeys");
                    reload.store(true, Ordering::SeqCst);
                }
            });
        }
        {
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                        .expect("SIGTERM handler");
                let mut signals = 0;
                loop {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                    signals += 1;
                    if signals == 1 {
                        info!("signal received: draining (a second signal exits at once)");
                        shutdown.store(true, Ordering::SeqCst);
                    } else {
                        error!("second signal: exiting without draining");
                        std::process::exit(130);
                    }
                }
            });
        }
        let worker = {
            let (cfg, journeys, metrics, shutdown) = (
                cfg.clone(),
                journeys.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            tokio::task::spawn_blocking(move || {
                crate::kafka::runtime::run(cfg, journeys, metrics, partitions, shutdown, reload)
            })
        };
        let result = worker.await;
        let _ = stop_http_tx.send(());
        let _ = server.await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                error!("stopping: {e:#}");
                eprintln!("waymark run: {e:#}");
                Err(1)
            }
            Err(e) => {
                eprintln!("waymark run: the processing thread failed: {e}");
                Err(1)
            }
        }
    })
}
