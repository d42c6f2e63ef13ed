//! Supervisor <-> worker control messages over a Unix stream socketpair.
//!
//! Frames are `u32 LE length | u8 tag | body`; strings inside a body are
//! `u32 LE length | UTF-8`. The codec is pure (bytes in, messages out) so both
//! ends can run it non-blocking in their event loops.

/// No control message comes near this; a larger length means a corrupt stream.
pub const MAX_FRAME: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    /// Supervisor -> worker: the config to serve (TOML text and where it came
    /// from, for error messages). Listener sockets were inherited in the
    /// order of the config's listeners.
    Start { origin: String, config: String },
    /// Worker -> supervisor: every listener is registered, serving.
    Ready,
    /// Worker -> supervisor: the worker cannot serve, and why.
    Fatal { message: String },
    /// Supervisor -> worker: stop reading clients, exit.
    Stop,
}

const TAG_START: u8 = 1;
const TAG_READY: u8 = 2;
const TAG_FATAL: u8 = 3;
const TAG_STOP: u8 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("control frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("unknown control message tag {0}")]
    UnknownTag(u8),
    #[error("malformed control message body")]
    BadBody,
}

impl ControlMsg {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let tag = match self {
            ControlMsg::Start { origin, config } => {
                put_str(&mut body, origin);
                put_str(&mut body, config);
                TAG_START
            }
            ControlMsg::Ready => TAG_READY,
            ControlMsg::Fatal { message } => {
                put_str(&mut body, message);
                TAG_FATAL
            }
            ControlMsg::Stop => TAG_STOP,
        };
        let mut frame = Vec::with_capacity(5 + body.len());
        frame.extend_from_slice(&((body.len() + 1) as u32).to_le_bytes());
        frame.push(tag);
        frame.extend_from_slice(&body);
        frame
    }

    fn decode(tag: u8, mut body: &[u8]) -> Result<ControlMsg, ControlError> {
        let msg = match tag {
            TAG_START => ControlMsg::Start {
                origin: take_str(&mut body)?,
                config: take_str(&mut body)?,
            },
            TAG_READY => ControlMsg::Ready,
            TAG_FATAL => ControlMsg::Fatal {
                message: take_str(&mut body)?,
            },
            TAG_STOP => ControlMsg::Stop,
            other => return Err(ControlError::UnknownTag(other)),
        };
        if !body.is_empty() {
            return Err(ControlError::BadBody);
        }
        Ok(msg)
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn take_str(body: &mut &[u8]) -> Result<String, ControlError> {
    let len_bytes: [u8; 4] = body
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(ControlError::BadBody)?;
    let len = u32::from_le_bytes(len_bytes) as usize;
    let bytes = body.get(4..4 + len).ok_or(ControlError::BadBody)?;
    let s = std::str::from_utf8(bytes).map_err(|_| ControlError::BadBody)?;
    *body = &body[4 + len..];
    Ok(s.to_owned())
}

/// Accumulates stream bytes and yields whole messages.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, if one has arrived.
    pub fn next_msg(&mut self) -> Option<Result<ControlMsg, ControlError>> {
        let len_bytes: [u8; 4] = self.buf.get(..4)?.try_into().ok()?;
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len == 0 || len > MAX_FRAME {
            self.buf.clear();
            return Some(Err(ControlError::TooLarge(len)));
        }
        if self.buf.len() < 4 + len {
            return None;
        }
        let msg = ControlMsg::decode(self.buf[4], &self.buf[5..4 + len]);
        self.buf.drain(..4 + len);
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_byte_by_byte() {
        let msgs = [
            ControlMsg::Start {
                origin: "/etc/udpshard/udpshard.toml".into(),
                config: "workers = 2\n".into(),
            },
            ControlMsg::Ready,
            ControlMsg::Fatal {
                message: "héllo".into(),
            },
            ControlMsg::Stop,
        ];
        let stream: Vec<u8> = msgs.iter().flat_map(|m| m.encode()).collect();
        let mut reader = FrameReader::default();
        let mut got = Vec::new();
        for b in stream {
            reader.push(&[b]);
            while let Some(m) = reader.next_msg() {
                got.push(m.unwrap());
            }
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn rejects_garbage() {
        let mut r = FrameReader::default();
        r.push(&[2, 0, 0, 0, 99, 0]);
        assert_eq!(r.next_msg(), Some(Err(ControlError::UnknownTag(99))));
        r.push(&[0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(r.next_msg(), Some(Err(ControlError::TooLarge(_)))));
        r.push(&[3, 0, 0, 0, TAG_FATAL, 9, 9]);
        assert_eq!(r.next_msg(), Some(Err(ControlError::BadBody)));
    }
}
