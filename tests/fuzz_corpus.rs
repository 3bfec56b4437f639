//! Every fuzz target's corpus replayed on stable (`fuzz/corpus/<target>/`): the seeds in
//! the repository and the inputs campaigns kept, so that CI keeps every parser passing on
//! what the fuzzer found. The targets themselves are `mxgate::fuzzing`; `fuzz/` runs them
//! under libFuzzer (nightly).

use std::path::Path;

#[test]
fn every_target_passes_its_whole_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in mxgate::fuzzing::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("an entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name}: no seed in {}", dir.display());
        for file in files {
            let input = std::fs::read(&file).expect("an input");
            if let Err(panic) = std::panic::catch_unwind(|| target(&input)) {
                let why = panic.downcast_ref::<String>().cloned().unwrap_or_default();
                panic!("{name}: {} fails: {why}", file.display());
            }
        }
    }
}

/// The seeds reach what they were written for (a target that silently stopped short
/// would pass any corpus): the plain conversation delivers its message; with the next
/// hop refusing the sender, or the final dot, nothing is acknowledged.
#[test]
fn the_session_seeds_reach_the_end_of_data() {
    let seed = |name: &str| std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/session").join(name));
    let plain = seed("plain").expect("seed");
    assert_eq!(mxgate::fuzzing::messages_acknowledged(&plain), 1);
    assert_eq!(mxgate::fuzzing::messages_acknowledged(&seed("refused-mail").expect("seed")), 0);
    let mut refused_dot = plain.clone();
    refused_dot[0] = 8;
    assert_eq!(mxgate::fuzzing::messages_acknowledged(&refused_dot), 0);
    assert_eq!(mxgate::fuzzing::messages_acknowledged(&seed("pipelined").expect("seed")), 1);
}
