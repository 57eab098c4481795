//! A kernel pipe that moves bytes from a socket into a file (`splice(2)`) without copying them
//! through user space: the socket's pages go into the pipe by reference, and from the pipe into
//! the file with the one copy the file needs.
//!
//! # Contract
//! - [`Pipe::fill_from`] never blocks (the socket and the pipe are non-blocking); it moves at
//!   most the pipe's capacity and says `WouldBlock` when the socket has nothing yet.
//! - [`Pipe::drain_to`] and [`Pipe::drain_into`] take exactly the bytes asked for out of the
//!   pipe; a pipe is only ever drained of what was just put into it, so it is empty between
//!   chunks. A pipe whose transfer failed midway must be dropped, not reused.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Bytes a pipe is asked to hold (Linux lets root raise a pipe to this by default).
const WANT_CAPACITY: libc::c_int = 1 << 20;

pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

fn check(rc: libc::ssize_t) -> io::Result<usize> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as usize)
    }
}

impl Pipe {
    /// A non-blocking pipe, raised to 1 MiB where allowed.
    pub fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both are open fds owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on an owned fd; a refusal leaves the default size.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, WANT_CAPACITY) };
        // SAFETY: as above.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if capacity <= 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Pipe { read, write, capacity: capacity as usize })
    }

    /// Bytes the pipe holds at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Move up to `n` bytes (at most the capacity) from socket `sock` into the pipe: how many,
    /// 0 at the end of the stream.
    pub fn fill_from(&self, sock: RawFd, n: usize) -> io::Result<usize> {
        let n = n.min(self.capacity);
        let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
        // SAFETY: splice between two open fds with null offsets (a socket and a pipe).
        check(unsafe { libc::splice(sock, std::ptr::null_mut(), self.write.as_raw_fd(), std::ptr::null_mut(), n, flags) })
    }

    /// Move exactly `n` bytes out of the pipe into file `fd` at `offset`.
    pub fn drain_to(&self, fd: RawFd, offset: u64, n: usize) -> io::Result<()> {
        let mut off = offset as libc::loff_t;
        let mut left = n;
        while left > 0 {
            // SAFETY: splice from the pipe into an open file at a valid offset pointer.
            let moved =
                check(unsafe { libc::splice(self.read.as_raw_fd(), std::ptr::null_mut(), fd, &mut off, left, libc::SPLICE_F_MOVE) })?;
            if moved == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the pipe ran dry"));
            }
            left -= moved;
        }
        Ok(())
    }

    /// Read exactly `buf.len()` bytes out of the pipe.
    pub fn drain_into(&self, buf: &mut [u8]) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: read into a valid, writable buffer of rest.len() bytes.
            let got = check(unsafe { libc::read(self.read.as_raw_fd(), rest.as_mut_ptr().cast(), rest.len()) })?;
            if got == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the pipe ran dry"));
            }
            done += got;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;

    /// Bytes sent on a socket land in the file at the offset asked, and the pipe is empty after.
    #[test]
    fn socket_bytes_reach_the_file_at_the_offset() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (rx, _) = l.accept().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let sender = {
            let d = data.clone();
            std::thread::spawn(move || tx.write_all(&d).unwrap())
        };
        let file = tempfile::tempfile().unwrap();
        let pipe = Pipe::new().unwrap();
        let mut got = 0;
        while got < data.len() {
            match pipe.fill_from(rx.as_raw_fd(), data.len() - got) {
                Ok(0) => panic!("stream ended early"),
                Ok(n) => {
                    pipe.drain_to(file.as_raw_fd(), 4096 + got as u64, n).unwrap();
                    got += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(std::time::Duration::from_millis(1)),
                Err(e) => panic!("{e}"),
            }
        }
        sender.join().unwrap();
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 4096).unwrap();
        assert!(back == data, "the file holds other bytes than were sent");
        let mut probe = [0u8; 1];
        assert!(std::fs::File::from(pipe.read.try_clone().unwrap()).read(&mut probe).is_err(), "bytes were left in the pipe");
    }
}
