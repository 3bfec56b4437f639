//! Bytes queued for a socket: appended at the end, consumed from the front as the driver
//! reports them sent.

/// Below this many sent bytes the front is not worth moving.
const COMPACT_AT: usize = 4096;

/// An output queue whose memory stays proportional to what is unsent: the sent front is
/// dropped once it is at least half of the buffer, so a stream that never fully drains
/// (a body going to the next hop while more arrives) does not grow it.
#[derive(Debug, Default)]
pub struct OutBuf {
    buf: Vec<u8>,
    sent: usize,
}

impl OutBuf {
    pub fn from_vec(buf: Vec<u8>) -> Self {
        OutBuf { buf, sent: 0 }
    }

    /// What is still to be sent.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.sent..]
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// For appending in place (body bytes from the filter).
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// `n` bytes of `pending` went out.
    pub fn consume(&mut self, n: usize) {
        self.sent = (self.sent + n).min(self.buf.len());
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        } else if self.sent >= COMPACT_AT && self.sent * 2 >= self.buf.len() {
            self.buf.drain(..self.sent);
            self.sent = 0;
        }
    }

    /// Bytes held, sent front included (what the buffer costs).
    pub fn held(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_that_never_drains_stays_bounded() {
        let mut q = OutBuf::default();
        for i in 0..10_000u32 {
            q.push(&[i as u8; 1000]);
            // the reader keeps up, but never quite empties the queue
            let n = q.pending().len() - 10;
            q.consume(n);
            assert!(q.held() <= 2 * COMPACT_AT + 2000, "{i}: {}", q.held());
        }
        assert_eq!(q.pending(), &[(9_999u32 as u8); 10][..]);
    }
}
