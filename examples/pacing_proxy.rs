//! A TCP proxy that caps each connection's download rate, the way a cloud object store
//! limits the throughput of one connection (tens of MB/s to ~100 MB/s on S3). Used by
//! `benches/fleet.sh` in front of the server that holds the models.
//!
//! ```text
//! pacing_proxy LISTEN UPSTREAM BYTES_PER_SECOND
//! ```
//!
//! The cap is the kernel's TCP pacing (`SO_MAX_PACING_RATE`) on each accepted socket, so it
//! applies per connection whatever the qdisc.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 4,
        "usage: pacing_proxy LISTEN UPSTREAM BYTES_PER_SECOND"
    );
    let listen: SocketAddr = args[1].parse()?;
    let upstream: SocketAddr = args[2].parse()?;
    let rate: u64 = args[3].parse()?;
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
                if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
            });
        }
    })
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
