//! A TCP relay in front of a server that the nemesis can cut: while cut, every open
//! connection is dropped and new ones are refused (closed at once) — to its clients the
//! server is down — while the server itself, and everything it stored, lives on.
//!
//! Used for the broker: tansu 0.6 on S3 storage was measured losing messages it had
//! acknowledged when its process was killed (or stopped) and started again — a defect
//! of that broker, not an outage any Kafka cluster with replication has — so the
//! broker outage is played by cutting it off instead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A relay from `127.0.0.1:port` to an upstream address.
#[derive(Clone)]
pub struct Cut {
    pub port: u16,
    cut: Arc<AtomicBool>,
    generation: watch::Sender<u64>,
    counter: Arc<AtomicU64>,
}

impl Cut {
    /// Listen on `port` and relay to `upstream` (`host:port`).
    pub async fn start(port: u16, upstream: String) -> Result<Self, String> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .map_err(|e| format!("relay on {port}: {e}"))?;
        let (generation, _) = watch::channel(0);
        let cut = Self {
            port,
            cut: Arc::default(),
            generation,
            counter: Arc::default(),
        };
        let relay = cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if relay.cut.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let mut dropped = relay.generation.subscribe();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let mut client = client;
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = dropped.changed() => {}
                    }
                });
            }
        });
        Ok(cut)
    }

    /// Drop every connection and refuse new ones until [`Cut::restore`].
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        let n = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
        self.generation.send_replace(n);
    }

    /// Let connections through again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}
