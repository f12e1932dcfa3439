//! Messages larger than NATS carries are published in parts (`Spool-Part: i/n`, see the
//! publisher); readers put them back together here.

use std::collections::HashMap;

use async_nats::HeaderMap;
use bytes::{Bytes, BytesMut};

use super::feed::Msg;
use super::header;

/// Reassembles messages published in parts (see `header::PART`), per subject: the whole message
/// takes the stream sequence of its last part. A part whose earlier parts are missing (purged
/// under it) is dropped with them.
#[derive(Default)]
pub struct Assembler {
    partial: HashMap<String, Partial>,
}

struct Partial {
    first: Msg,
    data: BytesMut,
    next: usize,
    parts: usize,
}

/// What one message of a subject amounts to.
pub enum Piece {
    Whole(Msg),
    /// A part of a message whose remaining parts follow.
    Part,
    /// Not Spool's, or a part that cannot be completed.
    Dropped,
}

impl Assembler {
    pub fn add(
        &mut self,
        subject: &str,
        seq: u64,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
    ) -> Piece {
        let Some(msg) = Msg::decode(seq, headers, payload) else {
            return Piece::Dropped;
        };
        let part = headers
            .and_then(|h| h.get(header::PART))
            .and_then(|p| p.as_str().split_once('/'))
            .and_then(|(i, n)| Some((i.parse::<usize>().ok()?, n.parse::<usize>().ok()?)));
        let Some((i, parts)) = part else {
            self.partial.remove(subject);
            return Piece::Whole(msg);
        };
        let last_pub_seq = msg.pub_seq;
        if i == 1 {
            let data = BytesMut::from(&msg.data[..]);
            self.partial.insert(
                subject.to_string(),
                Partial {
                    first: msg,
                    data,
                    next: 2,
                    parts,
                },
            );
        } else {
            match self.partial.get_mut(subject) {
                Some(p)
                    if p.next == i
                        && p.parts == parts
                        && (p.first.kind, p.first.epoch, p.first.gen)
                            == (msg.kind, msg.epoch, msg.gen) =>
                {
                    p.data.extend_from_slice(&msg.data);
                    p.next += 1;
                }
                _ => {
                    self.partial.remove(subject);
                    return Piece::Dropped;
                }
            }
        }
        if i < parts {
            return Piece::Part;
        }
        let p = self.partial.remove(subject).expect("just completed");
        let pub_seq = p.first.pub_seq.zip(last_pub_seq).map(|(f, l)| (f.0, l.1));
        Piece::Whole(Msg {
            seq,
            pub_seq,
            data: p.data.freeze(),
            ..p.first
        })
    }
}
