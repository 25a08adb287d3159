//! A TCP proxy that caps each connection's download rate, the way a cloud object store
//! limits the throughput of one connection (tens of MB/s to ~100 MB/s on S3). Used by
//! `benches/fleet.sh` in front of the server that holds the models.
//!
//! ```text
//! pacing_proxy LISTEN UPSTREAM BYTES_PER_SECOND [DELAY_MS]
//! ```
//!
//! The cap is the kernel's TCP pacing (`SO_MAX_PACING_RATE`) on each accepted socket, so it
//! applies per connection whatever the qdisc. `DELAY_MS` adds that much to every round trip
//! (`benches/hub.sh`: a far-away Hub, where tc netem is not available): a new connection
//! waits it before it reaches the upstream, and every request is held that long before it
//! is forwarded.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4 || args.len() == 5,
        "usage: pacing_proxy LISTEN UPSTREAM BYTES_PER_SECOND [DELAY_MS]"
    );
    let listen: SocketAddr = args[1].parse()?;
    let upstream: SocketAddr = args[2].parse()?;
    let rate: u64 = args[3].parse()?;
    let delay = std::time::Duration::from_millis(match args.get(4) {
        Some(d) => d.parse()?,
        None => 0,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        eprintln!("pacing proxy on {listen} -> {upstream}, {rate} B/s per connection");
        loop {
            let mut client = match listener.accept().await {
                Ok((c, _)) => c,
                Err(e) => {
                    eprintln!("accept: {e}");
                    continue;
                }
            };
            if let Err(e) = pace(&client, rate) {
                eprintln!("cannot pace a connection: {e}");
            }
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    if delay.is_zero() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    } else {
                        relay_delayed(client, server, delay).await;
                    }
                }
            });
        }
    })
}

/// Relay both ways, holding each chunk from the client `delay` before it goes upstream.
async fn relay_delayed(
    client: tokio::net::TcpStream,
    server: tokio::net::TcpStream,
    delay: std::time::Duration,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let up_read = async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = cr.read(&mut buf).await {
            if n == 0
                || tx
                    .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    };
    let up_write = async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if sw.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let _ = tokio::io::copy(&mut sr, &mut cw).await;
        let _ = cw.shutdown().await;
    };
    tokio::join!(up_read, up_write, down);
}

/// Cap what the kernel sends on `socket` to `rate` bytes per second.
fn pace(socket: &tokio::net::TcpStream, rate: u64) -> std::io::Result<()> {
    let rate = rate.min(u32::MAX as u64) as u32;
    // SAFETY: a valid socket descriptor, and a pointer to a u32 of the given size.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MAX_PACING_RATE,
            (&rate as *const u32).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
