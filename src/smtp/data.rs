//! The body of a DATA transaction, streamed: dot-unstuffing on receipt (RFC 5321
//! §4.5.2), dot-stuffing for the next hop, and the only end of data there is: CRLF "."
//! CRLF. The body is never held whole and never split into lines.
//!
//! ```text
//!            '.'              CR                 LF
//! LineStart ─────► DotStart ─────► DotCr ─────────────► end of data
//!   ▲  │ other         │ other: unstuff (drop the dot)
//!   │  ▼               ▼
//!   │ Middle ◄─────────┘ ◄── any byte after a fault (a bare LF never starts a line)
//!   │  │ CR
//!   │  ▼
//!   └─ Cr ── LF: the CRLF goes out
//! ```
//!
//! A bare CR or bare LF anywhere, a NUL (RFC 5321 §4.1.1.4 and RFC 6152 allow none: a
//! next hop that drops NULs would read CRLF NUL "." CRLF as the end), or more than the
//! size limit, faults the message: from
//! then on nothing more goes out, and the filter only looks for the end so that the
//! session stays in sync. Every byte is checked before it goes out: a CR is held until
//! its LF is seen and a leading dot until the next byte, so the next hop never receives
//! a bare CR or LF, nor a line that would end its data early.

/// Why a message is refused at its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFault {
    /// A CR not followed by LF, or an LF not preceded by CR.
    BareLineEnd,
    /// A NUL octet.
    Nul,
    /// More content than the size limit.
    TooBig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    LineStart,
    Middle,
    /// Saw CR; waiting for its LF.
    Cr,
    /// The line began with a dot.
    DotStart,
    /// The line is "." CR so far.
    DotCr,
}

#[derive(Debug)]
pub struct BodyFilter {
    state: State,
    /// Content bytes so far (unstuffed, line ends included).
    size: u64,
    max: u64,
    fault: Option<BodyFault>,
}

impl BodyFilter {
    pub fn new(max_size: u64) -> Self {
        BodyFilter { state: State::LineStart, size: 0, max: max_size, fault: None }
    }

    /// Takes body bytes; appends what the next hop gets to `out` (dot-stuffed; nothing
    /// once the message is faulty). Returns `Some(n)` when the end of data was found
    /// after `n` bytes of `input`: the rest of `input` is not part of the body.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Option<usize> {
        let mut i = 0;
        while i < input.len() {
            if self.state == State::Middle {
                // fast path: everything up to the next CR, LF or NUL is plain content
                let run = memchr::memchr3(b'\r', b'\n', 0, &input[i..]).unwrap_or(input.len() - i);
                self.content(&input[i..i + run], out);
                i += run;
                if i == input.len() {
                    break;
                }
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (state, 0) => {
                    let cr_pending = matches!(state, State::Cr | State::DotCr);
                    self.fault.get_or_insert(if cr_pending { BodyFault::BareLineEnd } else { BodyFault::Nul });
                    State::Middle
                }
                (State::LineStart, b'.') => State::DotStart,
                (State::DotStart, b'\r') => State::DotCr,
                (State::DotCr, b'\n') => {
                    self.state = State::LineStart;
                    return Some(i);
                }
                (State::DotStart, b'.') => {
                    // "..x" carries the content ".x", which goes out stuffed again
                    self.emit(b"..", 1, out);
                    State::Middle
                }
                (State::DotStart, other) if other != b'\n' => {
                    // a single leading dot is removed (unstuffing), the byte stays
                    self.content(&[other], out);
                    State::Middle
                }
                (State::LineStart | State::Middle, b'\r') => State::Cr,
                (State::Cr, b'\n') => {
                    self.content(b"\r\n", out);
                    State::LineStart
                }
                (State::LineStart, other) if other != b'\n' => {
                    self.content(&[other], out);
                    State::Middle
                }
                (state, other) => {
                    // bare LF, or a CR followed by something other than LF
                    self.fault.get_or_insert(BodyFault::BareLineEnd);
                    let cr_pending = matches!(state, State::Cr | State::DotCr);
                    if cr_pending && other == b'\r' { State::Cr } else { State::Middle }
                }
            };
        }
        None
    }

    /// Content bytes: counted, and sent unless the message is faulty.
    fn content(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        self.emit(bytes, bytes.len() as u64, out);
    }

    fn emit(&mut self, wire: &[u8], content_len: u64, out: &mut Vec<u8>) {
        self.size += content_len;
        if self.size > self.max {
            self.fault.get_or_insert(BodyFault::TooBig);
        }
        if self.fault.is_none() {
            out.extend_from_slice(wire);
        }
    }

    pub fn fault(&self) -> Option<BodyFault> {
        self.fault
    }

    /// Content bytes received so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// The body of a BDAT transaction (RFC 3030), streamed: chunks of counted octets, which
/// never end anything by their content. For a next hop that takes DATA they go out as a
/// DATA body: every line end made CRLF (a bare CR or LF too, as RFC 3030 §3 lets a
/// receiver of a BDAT message do), a leading dot stuffed, a last CRLF added if the
/// message does not end with one, so that nothing in a chunk can end the next hop's
/// data early. A NUL faults the message as in DATA; the size is the octets received.
///
/// ```text
///   LineStart ── '.' ──► ".." out, Middle        any other octet ──► out, Middle
///   Middle    ── CR ──► PendingCr ── LF ──► CRLF out, LineStart
///                                    └ other: CRLF out, LineStart, then the octet
///   any state ── bare LF ──► CRLF out, LineStart;   NUL ──► faulted (nothing more out)
/// ```
#[derive(Debug)]
pub struct ChunkFilter {
    /// The next hop takes BDAT: octets go out as they are (only counted and checked).
    verbatim: bool,
    /// At the start of a line (the next octet is the first of a line).
    line_start: bool,
    /// A CR was seen, its LF not yet.
    pending_cr: bool,
    size: u64,
    fault: Option<BodyFault>,
}

impl Default for ChunkFilter {
    fn default() -> Self {
        ChunkFilter { verbatim: false, line_start: true, pending_cr: false, size: 0, fault: None }
    }
}

impl ChunkFilter {
    /// For a next hop that takes BDAT: the octets go out as they came, up to a NUL.
    pub fn verbatim() -> Self {
        ChunkFilter { verbatim: true, ..ChunkFilter::default() }
    }

    /// The octets go out as they came (BDAT to the next hop), not as a DATA body.
    pub fn is_verbatim(&self) -> bool {
        self.verbatim
    }

    /// Takes chunk octets; appends their DATA form to `out` (nothing once faulty).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) {
        self.size = self.size.saturating_add(input.len() as u64);
        if self.verbatim {
            if self.fault.is_none() {
                let clean = memchr::memchr(0, input).unwrap_or(input.len());
                out.extend_from_slice(&input[..clean]);
                if clean < input.len() {
                    self.fault = Some(BodyFault::Nul);
                }
            }
            return;
        }
        let mut i = 0;
        while i < input.len() && self.fault.is_none() {
            if self.pending_cr {
                self.pending_cr = false;
                out.extend_from_slice(b"\r\n");
                self.line_start = true;
                if input[i] == b'\n' {
                    i += 1;
                    continue;
                }
            }
            let b = input[i];
            if self.line_start && b == b'.' {
                out.extend_from_slice(b"..");
                self.line_start = false;
                i += 1;
                continue;
            }
            // everything up to the next CR, LF or NUL is plain content
            let run = memchr::memchr3(b'\r', b'\n', 0, &input[i..]).unwrap_or(input.len() - i);
            if run > 0 {
                out.extend_from_slice(&input[i..i + run]);
                self.line_start = false;
                i += run;
                continue;
            }
            i += 1;
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => {
                    out.extend_from_slice(b"\r\n");
                    self.line_start = true;
                }
                _ => self.fault = Some(BodyFault::Nul),
            }
        }
    }

    /// The last chunk is in: the line end the message lacks, if it lacks one.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.verbatim && self.fault.is_none() && (self.pending_cr || !self.line_start) {
            out.extend_from_slice(b"\r\n");
            self.pending_cr = false;
            self.line_start = true;
        }
    }

    pub fn fault(&self) -> Option<BodyFault> {
        self.fault
    }

    /// Octets received so far.
    pub fn size(&self) -> u64 {
        self.size
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` in chunks of `chunk` bytes; returns (output, end offset, fault).
    fn run(input: &[u8], chunk: usize, max: u64) -> (Vec<u8>, Option<usize>, Option<BodyFault>) {
        let mut f = BodyFilter::new(max);
        let mut out = Vec::new();
        let mut offset = 0;
        for part in input.chunks(chunk.max(1)) {
            if let Some(n) = f.feed(part, &mut out) {
                return (out, Some(offset + n), f.fault());
            }
            offset += part.len();
        }
        (out, None, f.fault())
    }

    #[test]
    fn stuffing_round_trips() {
        let wire = b"Subject: x\r\n\r\n..leading dot\r\n.single\r\n...\r\nend\r\n.\r\nNEXT";
        for chunk in [1, 2, 3, 7, 1000] {
            let (out, end, fault) = run(wire, chunk, u64::MAX);
            assert_eq!(fault, None);
            assert_eq!(end, Some(wire.len() - 4), "chunk {chunk}");
            // unstuffed content: ".leading dot", "single", ".." -> restuffed for the next hop
            assert_eq!(out, b"Subject: x\r\n\r\n..leading dot\r\nsingle\r\n...\r\nend\r\n", "chunk {chunk}");
        }
    }

    #[test]
    fn empty_message_and_long_lines() {
        assert_eq!(run(b".\r\n", 1, 10), (vec![], Some(3), None));
        // a 998-octet line starting with a dot is 1001 octets with the stuffed dot and CRLF
        let mut line = b"..".to_vec();
        line.extend(std::iter::repeat_n(b'x', 997));
        line.extend_from_slice(b"\r\n.\r\n");
        let (out, end, fault) = run(&line, 64, u64::MAX);
        assert_eq!((end, fault), (Some(line.len()), None));
        assert_eq!(out.len(), 1001);
        // lines of any length pass
        let mut long = vec![b'y'; 100_000];
        long.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(run(&long, 4096, u64::MAX).0.len(), 100_002);
    }

    /// Every CR is followed by LF and every LF preceded by CR.
    fn only_crlf(bytes: &[u8]) -> bool {
        bytes.iter().enumerate().all(|(i, &b)| match b {
            b'\r' => bytes.get(i + 1) == Some(&b'\n'),
            b'\n' => i > 0 && bytes[i - 1] == b'\r',
            _ => true,
        })
    }

    /// Would-be ends of data used for SMTP smuggling: none of them is CRLF "." CRLF.
    pub(crate) const SMUGGLING_TRICKS: &[&[u8]] = &[
        b"\n.\n",
        b"\r.\r",
        b"\r.\n",
        b"\n.\r",
        b"\n.\r\n",
        b"\r\n.\n",
        b"\r.\r\n",
        b"\r\n.\r",
        b"\r\n\0.\r\n",
        b"\r\n.\0\r\n",
        b"\r\r\n.\r\r\n",
    ];

    /// None of the smuggling sequences ends the data, each faults the message, and what
    /// follows is never seen as commands.
    #[test]
    fn only_crlf_dot_crlf_ends_data() {
        let tricks = SMUGGLING_TRICKS;
        let smuggled = b"MAIL FROM:<a@evil.test>\r\nRCPT TO:<b@example.com>\r\nDATA\r\nsmuggled\r\n";
        for trick in tricks {
            let mut body = b"Subject: hi\r\n\r\nbody".to_vec();
            body.extend_from_slice(trick);
            body.extend_from_slice(smuggled);
            body.extend_from_slice(b"\r\n.\r\n");
            for chunk in [1, 3, 4096] {
                let (out, end, fault) = run(&body, chunk, u64::MAX);
                assert_eq!(end, Some(body.len()), "{trick:?}: only the real end ends the data");
                let nul = trick.contains(&0);
                let want = if nul { BodyFault::Nul } else { BodyFault::BareLineEnd };
                assert_eq!(fault, Some(want), "{trick:?} chunk {chunk}");
                assert!(only_crlf(&out), "bare line end sent for {trick:?}");
                assert!(!out.windows(5).any(|w| w == b"\r\n.\r\n"), "{trick:?}");
            }
        }
    }

    #[test]
    fn a_nul_anywhere_faults_the_message_and_nothing_after_it_goes_out() {
        for body in [&b"a\0b\r\n.\r\n"[..], b"\0\r\n.\r\n", b"ab\r\n.\0\r\n.\r\n", b"x\r\n\0"] {
            for chunk in [1, 2, 4096] {
                let (out, _, fault) = run(body, chunk, u64::MAX);
                assert_eq!(fault, Some(BodyFault::Nul), "{body:?} chunk {chunk}");
                assert!(!out.contains(&0), "{body:?}: a NUL went out");
            }
        }
        assert_eq!(run(b"a\0b\r\n.\r\n", 3, u64::MAX).1, Some(8), "the end is still found");
    }

    #[test]
    fn too_big_is_refused_but_the_end_is_still_found() {
        let mut body = vec![b'a'; 100];
        body.extend_from_slice(b"\r\n.\r\n");
        let (out, end, fault) = run(&body, 10, 50);
        assert_eq!((end, fault), (Some(body.len()), Some(BodyFault::TooBig)));
        assert!(out.len() <= 50);
        // exactly the limit is fine: 100 + CRLF = 102 content bytes
        assert_eq!(run(&body, 10, 102).2, None);
        assert_eq!(run(&body, 10, 101).2, Some(BodyFault::TooBig));
    }

    proptest! {
        /// Any body without bare line ends survives stuffing and unstuffing byte-exact.
        #[test]
        fn random_bodies_survive_exactly(lines in proptest::collection::vec("[ -~.]{0,80}", 0..40), chunk in 1usize..300) {
            let content: Vec<u8> = lines.iter().flat_map(|l| [l.as_bytes(), b"\r\n"].concat()).collect();
            // stuff it as a client would
            let mut wire = Vec::new();
            for l in &lines {
                if l.starts_with('.') { wire.push(b'.'); }
                wire.extend_from_slice(l.as_bytes());
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b".\r\n");
            let (out, end, fault) = run(&wire, chunk, u64::MAX);
            prop_assert_eq!(end, Some(wire.len()));
            prop_assert_eq!(fault, None);
            // the next hop gets the stuffed form; unstuffing it gives the content back
            let mut unstuffed = Vec::new();
            for l in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let l = l.strip_suffix(b"\r").unwrap_or(l);
                unstuffed.extend_from_slice(l.strip_prefix(b".").unwrap_or(l));
                unstuffed.extend_from_slice(b"\r\n");
            }
            prop_assert_eq!(unstuffed, content.clone());
            prop_assert_eq!(out, wire[..wire.len() - 3].to_vec());
        }
    }

    /// Feeds `input` to a chunk filter in pieces of `piece` octets, then finishes.
    fn chunked(input: &[u8], piece: usize) -> (Vec<u8>, Option<BodyFault>) {
        let mut f = ChunkFilter::default();
        let mut out = Vec::new();
        for part in input.chunks(piece.max(1)) {
            f.feed(part, &mut out);
        }
        f.finish(&mut out);
        assert_eq!(f.size(), input.len() as u64);
        (out, f.fault())
    }

    #[test]
    fn chunks_become_a_data_body_that_nothing_inside_can_end() {
        for piece in [1, 2, 3, 5, 1000] {
            let c = |input: &[u8]| chunked(input, piece);
            assert_eq!(c(b"a\r\nb\r\n"), (b"a\r\nb\r\n".to_vec(), None), "piece {piece}");
            assert_eq!(c(b"a\nb\rc\r\r\n"), (b"a\r\nb\r\nc\r\n\r\n".to_vec(), None), "bare LF and CR made CRLF");
            assert_eq!(c(b".\r\n..x\n.\r"), (b"..\r\n...x\r\n..\r\n".to_vec(), None), "leading dots stuffed");
            assert_eq!(c(b"no end"), (b"no end\r\n".to_vec(), None), "a last line end added");
            assert_eq!(c(b""), (Vec::new(), None), "an empty message is empty");
            assert_eq!(c(b"x\0y"), (b"x".to_vec(), Some(BodyFault::Nul)), "NUL: nothing more out");
            for trick in SMUGGLING_TRICKS {
                let (out, _) = c(&[b"a".as_slice(), trick, b"MAIL FROM:<x>\r\n"].concat());
                assert!(only_crlf(&out), "{trick:?} -> {out:?}");
                assert!(!out.windows(5).any(|w| w == b"\r\n.\r\n"), "{trick:?} -> {out:?}");
                assert!(!out.starts_with(b".\r\n"), "{trick:?}");
            }
        }
    }

    proptest! {
        #[test]
        fn chunk_filter_output_is_a_clean_data_body(input in proptest::collection::vec(proptest::sample::select(vec![b'a', b'.', b'\r', b'\n']), 0..200), piece in 1usize..50) {
            let (out, fault) = chunked(&input, piece);
            prop_assert_eq!(fault, None);
            prop_assert!(only_crlf(&out));
            prop_assert!(out.is_empty() || out.ends_with(b"\r\n"));
            // no line of the output is a lone dot: it cannot end the next hop's data
            prop_assert!(!out.split(|&b| b == b'\n').any(|l| l == b".\r"));
            // read back as DATA (unstuffed), the content is the input with line ends as CRLF
            let mut f = BodyFilter::new(u64::MAX);
            let mut back = Vec::new();
            let mut wire = out.clone();
            wire.extend_from_slice(b".\r\n");
            prop_assert_eq!(f.feed(&wire, &mut back), Some(wire.len()));
            prop_assert_eq!(back, out);
        }
    }
}
