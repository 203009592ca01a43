//! A bare HTTP/1.1 GET on loopback for the daemon's metrics listener, and
//! one sample's value out of a Prometheus text body.

use std::io::{Read as _, Write as _};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::time::Duration;

/// Connect, send and each read are bounded by this.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply read (a /metrics body is a few KiB).
const REPLY_BYTES_MAX: u64 = 16 << 20;

/// Why a GET or a sample failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("GET http://{addr}{path}: {source}")]
    Io {
        addr: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GET http://{addr}{path}: {addr} resolves to no address")]
    NoAddress { addr: String, path: String },
    #[error("GET http://{addr}{path}: not an HTTP reply: {head:?}")]
    Malformed {
        addr: String,
        path: String,
        head: String,
    },
    #[error("GET http://{addr}{path}: a chunked reply, which this client does not decode")]
    Chunked { addr: String, path: String },
    #[error("GET http://{addr}{path}: status {status}")]
    Status {
        addr: String,
        path: String,
        status: u16,
    },
    #[error("sample {series}: {value:?} is not a number")]
    NotANumber { series: String, value: String },
}

/// `GET path` on `addr` (`host:port`): the status and the body.
pub fn http_get(addr: &str, path: &str) -> Result<(u16, String), HttpError> {
    let io = |source| HttpError::Io {
        addr: addr.to_owned(),
        path: path.to_owned(),
        source,
    };
    let target =
        addr.to_socket_addrs()
            .map_err(io)?
            .next()
            .ok_or_else(|| HttpError::NoAddress {
                addr: addr.to_owned(),
                path: path.to_owned(),
            })?;
    let mut stream = TcpStream::connect_timeout(&target, IO_TIMEOUT).map_err(io)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut reply = Vec::new();
    stream
        .take(REPLY_BYTES_MAX)
        .read_to_end(&mut reply)
        .map_err(io)?;
    let reply = String::from_utf8_lossy(&reply);
    let malformed = || HttpError::Malformed {
        addr: addr.to_owned(),
        path: path.to_owned(),
        head: reply.chars().take(80).collect(),
    };
    let (head, body) = reply.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|line| {
            let mut words = line.split_whitespace();
            let version = words.next()?;
            version.starts_with("HTTP/").then_some(())?;
            words.next()?.parse::<u16>().ok()
        })
        .ok_or_else(malformed)?;
    let chunked = lines.any(|header| {
        header.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding")
                && value.to_ascii_lowercase().contains("chunked")
        })
    });
    if chunked {
        return Err(HttpError::Chunked {
            addr: addr.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok((status, body.to_owned()))
}

/// The body of a `200` reply to `GET path`; another status is an error.
pub fn http_get_ok(addr: &str, path: &str) -> Result<String, HttpError> {
    match http_get(addr, path)? {
        (200, body) => Ok(body),
        (status, _) => Err(HttpError::Status {
            addr: addr.to_owned(),
            path: path.to_owned(),
            status,
        }),
    }
}

/// The value of the sample `series` (`name{labels}`, labels exactly as
/// exported) in a Prometheus text body; `None` when it is not there.
pub fn sample(body: &str, series: &str) -> Result<Option<f64>, HttpError> {
    let Some(value) = body.lines().find_map(|line| {
        line.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
    }) else {
        return Ok(None);
    };
    // A sample line may end in a timestamp: the value is the first word.
    let value = value.split_whitespace().next().unwrap_or_default();
    value.parse().map(Some).map_err(|_| HttpError::NotANumber {
        series: series.to_owned(),
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Serves one connection with `reply`, after reading the request.
    fn serve_once(reply: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") {
                conn.read_exact(&mut byte).expect("request");
                request.extend_from_slice(&byte);
            }
            conn.write_all(reply.as_bytes()).expect("reply");
            String::from_utf8(request).expect("utf-8")
        });
        (addr, server)
    }

    #[test]
    fn a_get_returns_status_and_body_and_sends_one_closing_request() {
        let (addr, server) = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nx 1.5\n");
        assert_eq!(
            http_get(&addr, "/metrics").expect("get"),
            (200, "x 1.5\n".to_owned())
        );
        let request = server.join().expect("server");
        assert!(
            request.starts_with("GET /metrics HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("Connection: close\r\n"), "{request}");
    }

    #[test]
    fn another_status_is_an_error_for_http_get_ok() {
        let (addr, server) = serve_once("HTTP/1.1 404 Not Found\r\n\r\n");
        assert!(matches!(
            http_get_ok(&addr, "/nope"),
            Err(HttpError::Status { status: 404, .. })
        ));
        server.join().expect("server");
    }

    #[test]
    fn a_reply_that_is_not_http_or_is_chunked_is_an_error() {
        let (addr, server) = serve_once("hello\r\n\r\n");
        assert!(matches!(
            http_get(&addr, "/"),
            Err(HttpError::Malformed { .. })
        ));
        server.join().expect("server");
        let (addr, server) =
            serve_once("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n");
        assert!(matches!(
            http_get(&addr, "/"),
            Err(HttpError::Chunked { .. })
        ));
        server.join().expect("server");
    }

    #[test]
    fn samples_are_found_by_series_exactly() {
        let body = "# HELP x\ngpusnap_stall_seconds_sum{job=\"bench\"} 0.25\n\
                    gpusnap_stall_seconds_count{job=\"bench\"} 5 1700000000\n\
                    gpusnap_stall_seconds_count{job=\"bench2\"} 9\n";
        let get = |s: &str| sample(body, s).expect("a number");
        assert_eq!(get("gpusnap_stall_seconds_sum{job=\"bench\"}"), Some(0.25));
        assert_eq!(get("gpusnap_stall_seconds_count{job=\"bench\"}"), Some(5.0));
        assert_eq!(
            get("gpusnap_stall_seconds_count{job=\"bench2\"}"),
            Some(9.0)
        );
        assert_eq!(get("gpusnap_stall_seconds_sum{job=\"x\"}"), None);
        assert_eq!(
            get("gpusnap_stall_seconds"),
            None,
            "a prefix is not a series"
        );
        assert!(matches!(
            sample("x one\n", "x"),
            Err(HttpError::NotANumber { .. })
        ));
    }
}
