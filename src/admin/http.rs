//! The little HTTP/1.x the admin endpoint speaks: a request head parsed by
//! httparse from a bounded buffer, and a response with a known length.

/// Most bytes of one request head (request line and headers).
pub(super) const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most header lines in one request.
pub(super) const MAX_HEADERS: usize = 32;

/// A complete request head, borrowed from the input buffer.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Head<'a> {
    pub method: &'a str,
    /// The request target, without its query or fragment.
    pub path: &'a str,
    /// Whether the client asked to keep the connection open after the answer
    /// (HTTP/1.1 unless `Connection: close`; HTTP/1.0 only with
    /// `Connection: keep-alive`).
    pub keep_alive: bool,
    /// Whether a body follows the head. The endpoint reads no body, so such a
    /// request is answered and the connection closed.
    pub has_body: bool,
}

/// What the bytes held so far make.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Parsed<'a> {
    /// A request head and how many bytes it took.
    Complete(Head<'a>, usize),
    /// Not a whole head yet.
    Partial,
    /// Not HTTP, or past a limit: answer this and close.
    Bad(Response),
}

/// Parses the head at the start of `buf`; `buf` is never longer than
/// [`MAX_HEAD_BYTES`], so a partial head filling it is too large.
pub(super) fn parse(buf: &[u8]) -> Parsed<'_> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD_BYTES => return Parsed::Partial,
        Ok(httparse::Status::Partial) => {
            return Parsed::Bad(Response::text(
                431,
                format!("request head larger than {MAX_HEAD_BYTES} bytes\n"),
            ))
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Bad(Response::text(
                431,
                format!("more than {MAX_HEADERS} header lines\n"),
            ))
        }
        Err(e) => return Parsed::Bad(Response::text(400, format!("bad request: {e}\n"))),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Bad(Response::text(400, "bad request\n".into()));
    };
    let mut close = false;
    let mut keep = false;
    let mut has_body = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            for token in String::from_utf8_lossy(h.value).split(',') {
                let token = token.trim();
                close |= token.eq_ignore_ascii_case("close");
                keep |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            has_body = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(h.value).map(|v| v.trim().parse::<u64>()) {
                Ok(Ok(n)) => has_body |= n > 0,
                _ => {
                    return Parsed::Bad(Response::text(400, "bad request: content-length\n".into()))
                }
            }
        }
    }
    let keep_alive = !close && (version == 1 || keep);
    let path = target.split(['?', '#']).next().unwrap_or(target);
    Parsed::Complete(
        Head {
            method,
            path,
            keep_alive,
            has_body,
        },
        len,
    )
}

/// An answer: status, content type and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub(super) fn text(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "text/plain",
            body,
        }
    }

    /// Appends the whole response to `out`; without the body for HEAD.
    pub(super) fn encode(&self, out: &mut Vec<u8>, with_body: bool, keep_alive: bool) {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: {connection}\r\n\r\n",
                self.status,
                reason(self.status),
                self.content_type,
                self.body.len(),
            )
            .as_bytes(),
        );
        if with_body {
            out.extend_from_slice(self.body.as_bytes());
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(p: Parsed<'_>) -> u16 {
        match p {
            Parsed::Bad(r) => r.status,
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_get_is_parsed_with_its_length_and_path_without_query() {
        let req = b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\nGET /livez";
        let Parsed::Complete(head, len) = parse(req) else {
            panic!("not complete")
        };
        assert_eq!(len, req.len() - "GET /livez".len());
        assert_eq!(
            head,
            Head {
                method: "GET",
                path: "/metrics",
                keep_alive: true,
                has_body: false
            }
        );
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        let ka = |req: &[u8]| match parse(req) {
            Parsed::Complete(h, _) => h.keep_alive,
            other => panic!("{other:?}"),
        };
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: x, close\r\n\r\n"));
    }

    #[test]
    fn a_body_is_noticed() {
        for req in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let Parsed::Complete(h, _) = parse(req) else {
                panic!()
            };
            assert!(h.has_body);
        }
        assert_eq!(
            status(parse(b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n")),
            400
        );
    }

    #[test]
    fn limits_and_garbage_are_refused() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a\r\n"), Parsed::Partial);
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD_BYTES, b'a');
        assert_eq!(status(parse(&big)), 431);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(status(parse(&many)), 431);
        assert_eq!(status(parse(b"NOT HTTP AT ALL\r\n\r\n")), 400);
        assert_eq!(status(parse(b"\x01\x02\x03\r\n\r\n")), 400);
    }

    #[test]
    fn a_response_has_its_length_and_no_body_for_head() {
        let r = Response::text(200, "ok\n".into());
        let mut out = Vec::new();
        r.encode(&mut out, false, true);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.ends_with("Connection: keep-alive\r\n\r\n"), "{text}");
    }
}
