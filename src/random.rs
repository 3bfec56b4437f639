//! Unpredictable numbers from the kernel (`getrandom(2)`): DNS query ids and temporary
//! file names. A low module: it uses nothing of the crate, so that whoever needs
//! randomness (the resolver, the state files) depends on it alone.

use std::io;

/// Fills `bytes` from the kernel's random source.
pub fn fill(bytes: &mut [u8]) -> io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        let rest = &mut bytes[at..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer it is given
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) => at += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// An unpredictable 16-bit number (DNS query ids); 0 if the kernel's source ever fails
/// (it does not, once the kernel has seeded it at boot).
pub fn u16() -> u16 {
    let mut bytes = [0u8; 2];
    fill(&mut bytes).map_or(0, |()| u16::from_ne_bytes(bytes))
}

/// 128 unpredictable bits in hex (temporary file names).
pub fn hex128() -> io::Result<String> {
    let mut bytes = [0u8; 16];
    fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_do_not_repeat() {
        let names: std::collections::HashSet<String> = (0..50).map(|_| hex128().unwrap()).collect();
        assert_eq!(names.len(), 50);
        assert!(names.iter().all(|n| n.len() == 32 && n.bytes().all(|b| b.is_ascii_hexdigit())));
        let ids: std::collections::HashSet<u16> = (0..64).map(|_| u16()).collect();
        assert!(ids.len() > 32, "64 query ids, {} distinct", ids.len());
    }
}
