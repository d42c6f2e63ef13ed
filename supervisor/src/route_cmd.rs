//! `udpshard route --config F CID`: the backend a config sends a connection
//! ID to, and why, computed by the workers' own routing code. Hosts of a
//! fleet that print the same line for a CID agree on it without any traffic.

use std::path::Path;
use std::process::ExitCode;

use udpshard_config as config;
use udpshard_worker::router::{PickedBy, Route};

/// The longest connection ID QUIC allows (RFC 9000, section 17.2).
const MAX_CID: usize = 20;

/// Exit status for a CID or listener name that cannot be routed.
const USAGE: u8 = 2;

pub(crate) fn run(file: &Path, listener: Option<&str>, cid: &str) -> ExitCode {
    let key = match parse_cid(cid) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("udpshard route: {e}");
            return ExitCode::from(USAGE);
        }
    };
    let cfg = match config::load(file) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let chosen: Vec<&config::Listener> = cfg
        .listeners
        .iter()
        .filter(|l| listener.is_none_or(|name| l.name == name))
        .collect();
    if chosen.is_empty() {
        let names: Vec<&str> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
        eprintln!(
            "udpshard route: no listener {:?} in {} (it has: {})",
            listener.unwrap_or_default(),
            file.display(),
            names.join(", ")
        );
        return ExitCode::from(USAGE);
    }
    let mut routed = 0;
    for l in chosen {
        match describe(l, &key) {
            Ok(text) => {
                routed += 1;
                print!("{text}");
            }
            Err(why) => println!("{}: {why}", l.name),
        }
    }
    if routed == 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// A connection ID in hex (an optional `0x`, no separators), 1 to 20 bytes.
fn parse_cid(text: &str) -> Result<Vec<u8>, String> {
    let hex = text.strip_prefix("0x").unwrap_or(text);
    let bad = |why: &str| format!("{text:?} is not a connection ID: {why}");
    if hex.is_empty() {
        return Err(bad("it is empty"));
    }
    if let Some(c) = hex.chars().find(|c| !c.is_ascii_hexdigit()) {
        return Err(bad(&format!("{c:?} is not a hex digit")));
    }
    if hex.len() % 2 == 1 {
        return Err(bad("an odd number of hex digits"));
    }
    if hex.len() / 2 > MAX_CID {
        return Err(bad(&format!(
            "{} bytes; QUIC connection IDs have at most {MAX_CID}",
            hex.len() / 2
        )));
    }
    Ok((0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap_or_default())
        .collect())
}

/// What listener `l` does with a new flow keyed `key`.
fn describe(l: &config::Listener, key: &[u8]) -> Result<String, String> {
    let expected = match l.dissector {
        config::Dissector::Tuple => {
            return Err(
                "keys flows by the client's address and port, not by a connection ID".into(),
            )
        }
        config::Dissector::Quic { short_cid_len } => short_cid_len,
        config::Dissector::Bytes { cid_len, .. } => cid_len,
    };
    let route = Route::new(l, false).map_err(|e| e.to_string())?;
    let pick = route.explain(key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut out = format!(
        "{}: {hex} -> backend {} {}\n",
        l.name, pick.backend, route.backends[pick.backend]
    );
    match pick.by {
        PickedBy::ServerId => {
            let lb = l
                .quic_lb
                .as_ref()
                .map_or((0, 0), |lb| (lb.config_id, lb.server_id_len));
            let id: String = key[1..1 + lb.1]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            out += &format!("  QUIC-LB: server ID {id} (config_id {})\n", lb.0);
        }
        PickedBy::Maglev { hash, slot, size } => {
            if let Some(lb) = &l.quic_lb {
                out += &format!(
                    "  QUIC-LB: no server ID of config_id {} in it, so Maglev decides\n",
                    lb.config_id
                );
            }
            out += &format!("  Maglev: key hash {hash:#018x}, slot {slot} of {size}\n");
        }
    }
    if key.len() != expected {
        out += &format!(
            "  note: this listener reads {expected}-byte IDs from short-header datagrams; this one has {}\n",
            key.len()
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_ids_parse_as_hex_of_1_to_20_bytes() {
        assert_eq!(parse_cid("0a0B").unwrap(), vec![0x0a, 0x0b]);
        assert_eq!(parse_cid("0xff").unwrap(), vec![0xff]);
        assert_eq!(parse_cid(&"ab".repeat(20)).unwrap().len(), 20);
        for bad in ["", "0x", "abc", "zz", "0a:0b", &"ab".repeat(21)] {
            assert!(parse_cid(bad).is_err(), "{bad:?}");
        }
        assert!(parse_cid("0g")
            .unwrap_err()
            .contains("'g' is not a hex digit"));
    }
}
