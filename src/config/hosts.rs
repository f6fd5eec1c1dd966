//! The syntax of `Host` values and of origins, in one place: the settings'
//! checks (`server.allowed_hosts`, `server.allowed_origins`) and the HTTP
//! layer's guard against cross-site requests must agree on what a valid
//! name is, or a setting that passed its check could never match.

use std::net::{Ipv4Addr, Ipv6Addr};

/// Most entries in `server.allowed_hosts` or in `server.allowed_origins`;
/// each request is compared with every entry, so the lists stay short.
pub const MAX_ALLOWED_ENTRIES: usize = 64;

/// The name part of a `Host` value (`name`, `name:port`, `[v6]` or
/// `[v6]:port`), brackets kept; `None` when the value is malformed.
pub fn host_name(authority: &str) -> Option<&str> {
    let (name, rest) = match authority.strip_prefix('[') {
        Some(inside) => {
            let end = inside.find(']')?;
            inside[..end].parse::<Ipv6Addr>().ok()?;
            authority.split_at(end + 2)
        }
        None => {
            let end = authority.find(':').unwrap_or(authority.len());
            let name = &authority[..end];
            let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_');
            if name.is_empty() || !name.chars().all(allowed) {
                return None;
            }
            authority.split_at(end)
        }
    };
    match rest.strip_prefix(':') {
        None if rest.is_empty() => Some(name),
        Some(port) if port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok() => {
            Some(name)
        }
        _ => None,
    }
}

/// Whether a name from [`host_name`] is a loopback one: `localhost`, an
/// address in 127.0.0.0/8, or `[::1]`. Names that merely resolve to
/// loopback do not count: a DNS-rebinding page owns such a name.
pub fn is_loopback_name(name: &str) -> bool {
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return v6.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback());
    }
    name.parse::<Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
}

/// The `host[:port]` of an origin (`http://host[:port]` or
/// `https://host[:port]`, nothing after it); `None` for anything else,
/// `null` (an opaque origin) included.
pub fn origin_authority(origin: &str) -> Option<&str> {
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))?;
    host_name(authority).map(|_| authority)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Names, IPv4 and bracketed IPv6 hosts parse with or without a port; anything else is malformed.
    #[test]
    fn host_values() {
        assert_eq!(host_name("localhost:8080"), Some("localhost"));
        assert_eq!(host_name("127.0.0.5"), Some("127.0.0.5"));
        assert_eq!(host_name("[::1]:9"), Some("[::1]"));
        assert_eq!(host_name("[::1]"), Some("[::1]"));
        assert_eq!(host_name("kpay.internal"), Some("kpay.internal"));
        for bad in [
            "", ":80", "a:", "a:99999", "a:+80", "a b", "[::1", "[zz]", "::1", "a/b", "u@h",
        ] {
            assert_eq!(host_name(bad), None, "{bad:?}");
        }
    }

    // Only literal loopback names count, not names that happen to start like them.
    #[test]
    fn loopback_names() {
        for name in [
            "localhost",
            "LocalHost",
            "127.0.0.1",
            "127.255.0.9",
            "[::1]",
        ] {
            assert!(is_loopback_name(name), "{name}");
        }
        for name in [
            "127.0.0.1.evil.example",
            "localhost.evil",
            "10.0.0.1",
            "[::2]",
        ] {
            assert!(!is_loopback_name(name), "{name}");
        }
    }

    // An origin is a scheme of http(s) and a host with an optional port, nothing more.
    #[test]
    fn origins() {
        assert_eq!(
            origin_authority("http://127.0.0.1:8080"),
            Some("127.0.0.1:8080")
        );
        assert_eq!(origin_authority("https://ops.example"), Some("ops.example"));
        for bad in [
            "null",
            "ftp://a",
            "http://",
            "http://a/",
            "http://a:1/x",
            "a",
        ] {
            assert_eq!(origin_authority(bad), None, "{bad:?}");
        }
    }
}
