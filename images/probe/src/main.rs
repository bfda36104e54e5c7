//! `probe`: the network test tool of Palisade's guest image. Static, no dependencies beyond
//! libc, driven from the serial console; every result is one line starting with `PROBE`.
//!
//! ```text
//! probe send IFACE HEX [COUNT]          send a raw Ethernet frame COUNT times (default 1)
//! probe sniff IFACE MARKER SECONDS      promiscuous capture; count frames holding MARKER (hex)
//! probe serve PORT                      TCP: echo every line back, print it
//! probe talk ADDR PORT COUNT INTERVAL_MS   TCP: send numbered lines, report which came back
//! probe sink PORT                       TCP: read each connection to its end, say how much
//! probe push ADDR PORT BYTES            TCP: send BYTES, say how long it took
//! probe http METHOD ADDR PORT PATH [NAME:VALUE…]   one HTTP/1.0 request: status and body
//! probe ttl IFACE SRC SECONDS           the lowest IP TTL of packets from SRC
//! ```
// Raw packet sockets need libc calls; each unsafe block says why it is sound.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["send", iface, hex] => send(iface, hex, 1),
        ["send", iface, hex, count] => count
            .parse()
            .map_err(|_| "COUNT must be a number".to_string())
            .and_then(|n| send(iface, hex, n)),
        ["sniff", iface, marker, secs] => secs
            .parse()
            .map_err(|_| "SECONDS must be a number".to_string())
            .and_then(|s| sniff(iface, marker, s)),
        ["serve", port] => serve(port),
        ["talk", addr, port, count, interval] => talk(addr, port, count, interval),
        ["sink", port] => sink(port),
        ["push", addr, port, bytes] => push(addr, port, bytes),
        ["http", method, addr, port, path, headers @ ..] => http(method, addr, port, path, headers),
        ["ttl", iface, src, secs] => secs
            .parse()
            .map_err(|_| "SECONDS must be a number".to_string())
            .and_then(|s| ttl(iface, src, s)),
        _ => Err("usage: probe send|sniff|serve|talk … (see the source)".into()),
    };
    if let Err(e) = result {
        println!("PROBE error {e}");
        std::process::exit(1);
    }
}

fn unhex(text: &str) -> Result<Vec<u8>, String> {
    if !text.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(|_| "not hex".to_string()))
        .collect()
}

/// A raw packet socket bound to `iface`, all protocols.
fn packet_socket(iface: &str) -> Result<(i32, i32), String> {
    let name = std::ffi::CString::new(iface).map_err(|_| "bad interface name")?;
    // SAFETY: plain syscalls on values we own; the name is a valid C string.
    unsafe {
        let index = libc::if_nametoindex(name.as_ptr()) as i32;
        if index == 0 {
            return Err(format!("no interface {iface}"));
        }
        let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
        if fd < 0 {
            return Err(format!("socket: {}", std::io::Error::last_os_error()));
        }
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto as u16;
        addr.sll_ifindex = index;
        let rc = libc::bind(
            fd,
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        if rc != 0 {
            return Err(format!("bind: {}", std::io::Error::last_os_error()));
        }
        // Reads give up after 200 ms, so a capture loop can watch its deadline.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        Ok((fd, index))
    }
}

fn send(iface: &str, hex: &str, count: u32) -> Result<(), String> {
    let frame = unhex(hex)?;
    let (fd, _) = packet_socket(iface)?;
    let mut sent = 0;
    for _ in 0..count {
        // SAFETY: the buffer is valid for its length; fd is our socket.
        let n = unsafe { libc::send(fd, frame.as_ptr().cast(), frame.len(), 0) };
        if n == frame.len() as isize {
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("PROBE sent {sent}/{count}");
    Ok(())
}

fn sniff(iface: &str, marker: &str, secs: u64) -> Result<(), String> {
    let marker = unhex(marker)?;
    if marker.is_empty() {
        return Err("empty marker".into());
    }
    let (fd, index) = packet_socket(iface)?;
    // SAFETY: setsockopt with a properly sized packet_mreq.
    unsafe {
        let mut mreq: libc::packet_mreq = std::mem::zeroed();
        mreq.mr_ifindex = index;
        mreq.mr_type = libc::PACKET_MR_PROMISC as u16;
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_ADD_MEMBERSHIP,
            (&mreq as *const libc::packet_mreq).cast(),
            std::mem::size_of::<libc::packet_mreq>() as u32,
        );
    }
    println!("PROBE sniffing");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = vec![0u8; 65536];
    let mut hits = 0;
    while Instant::now() < deadline {
        // SAFETY: the buffer is valid for its length; fd is our socket.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 && buf[..n as usize].windows(marker.len()).any(|w| w == marker) {
            hits += 1;
        }
    }
    println!("PROBE sniffed {hits}");
    Ok(())
}

fn serve(port: &str) -> Result<(), String> {
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| e.to_string())?;
    println!("PROBE serving {port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let Ok(mut out) = stream.try_clone() else {
                return;
            };
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                println!("PROBE got {line} from {peer}");
                if writeln!(out, "{line}").is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

fn talk(addr: &str, port: &str, count: &str, interval: &str) -> Result<(), String> {
    let count: u32 = count.parse().map_err(|_| "COUNT must be a number")?;
    let interval: u64 = interval
        .parse()
        .map_err(|_| "INTERVAL_MS must be a number")?;
    let target = format!("{addr}:{port}");
    let sock: std::net::SocketAddr = target.parse().map_err(|_| "bad address")?;
    let stream = match TcpStream::connect_timeout(&sock, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => {
            println!("PROBE connect failed {e}");
            return Ok(());
        }
    };
    println!("PROBE connected {target}");
    stream
        .set_read_timeout(Some(Duration::from_millis(interval.max(100))))
        .map_err(|e| e.to_string())?;
    let mut out = stream.try_clone().map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream);
    let mut echoed = Vec::new();
    for seq in 1..=count {
        let _ = writeln!(out, "seq-{seq}");
        let mut line = String::new();
        if reader.read_line(&mut line).is_ok() && line.trim() == format!("seq-{seq}") {
            echoed.push(seq);
        }
        std::thread::sleep(Duration::from_millis(interval));
    }
    let list: Vec<String> = echoed.iter().map(u32::to_string).collect();
    println!(
        "PROBE echoed {} of {count}: {}",
        echoed.len(),
        list.join(",")
    );
    Ok(())
}

fn sink(port: &str) -> Result<(), String> {
    let listener = TcpListener::bind(format!("0.0.0.0:{port}")).map_err(|e| e.to_string())?;
    println!("PROBE sinking {port}");
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let started = Instant::now();
            let mut total = 0u64;
            let mut buf = vec![0u8; 65536];
            let mut stream = stream;
            while let Ok(n) = std::io::Read::read(&mut stream, &mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            println!(
                "PROBE sank {total} bytes in {} ms",
                started.elapsed().as_millis()
            );
        });
    }
    Ok(())
}

fn push(addr: &str, port: &str, bytes: &str) -> Result<(), String> {
    let bytes: u64 = bytes.parse().map_err(|_| "BYTES must be a number")?;
    let sock: std::net::SocketAddr = format!("{addr}:{port}")
        .parse()
        .map_err(|_| "bad address")?;
    let mut stream = match TcpStream::connect_timeout(&sock, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => {
            println!("PROBE connect failed {e}");
            return Ok(());
        }
    };
    let started = Instant::now();
    let chunk = vec![0x5au8; 16384];
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        if stream.write_all(&chunk[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // Wait for the far end to close: everything was received.
    let _ = std::io::Read::read(&mut stream, &mut [0u8; 1]);
    println!(
        "PROBE pushed {sent} bytes in {} ms",
        started.elapsed().as_millis()
    );
    Ok(())
}

fn http(method: &str, addr: &str, port: &str, path: &str, headers: &[&str]) -> Result<(), String> {
    let sock: std::net::SocketAddr = format!("{addr}:{port}")
        .parse()
        .map_err(|_| "bad address")?;
    let mut stream = match TcpStream::connect_timeout(&sock, Duration::from_secs(3)) {
        Ok(s) => s,
        Err(e) => {
            println!("PROBE connect failed {e}");
            return Ok(());
        }
    };
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for header in headers {
        let Some((name, value)) = header.split_once(':') else {
            return Err(format!("{header:?} is not NAME:VALUE"));
        };
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    let _ = std::io::Read::read_to_string(&mut stream, &mut response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    println!("PROBE http {}", head.lines().next().unwrap_or(""));
    for line in body.lines() {
        println!("PROBE body {line}");
    }
    println!("PROBE http done");
    Ok(())
}

fn ttl(iface: &str, src: &str, secs: u64) -> Result<(), String> {
    let src: std::net::Ipv4Addr = src.parse().map_err(|_| "SRC must be an IPv4 address")?;
    let (fd, _) = packet_socket(iface)?;
    println!("PROBE watching");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = vec![0u8; 65536];
    let mut lowest: Option<u8> = None;
    while Instant::now() < deadline {
        // SAFETY: the buffer is valid for its length; fd is our socket.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 34 {
            continue;
        }
        let frame = &buf[..n as usize];
        // Ethernet, IPv4: TTL at byte 22, source at 26..30.
        if frame[12..14] == [0x08, 0x00] && frame[26..30] == src.octets() {
            lowest = Some(lowest.map_or(frame[22], |l| l.min(frame[22])));
        }
    }
    match lowest {
        Some(t) => println!("PROBE ttl {t}"),
        None => println!("PROBE ttl none"),
    }
    Ok(())
}
