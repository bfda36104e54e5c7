//! Tenant networks on this host: VPC bridges, ports, routers, and the rules that isolate them.

pub mod conntrack;
pub mod dhcp;
pub mod host;
pub mod metadata;
pub mod nft;

/// `SO_BINDTODEVICE`: the socket sends and receives on `device` only.
#[allow(unsafe_code)]
pub fn bind_to_device(socket: &impl std::os::fd::AsRawFd, device: &str) -> std::io::Result<()> {
    let name = device.as_bytes();
    // SAFETY: setsockopt reads `name.len()` bytes from a live slice; the descriptor is ours.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            name.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
