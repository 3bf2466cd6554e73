//! Replays the seed corpus of every fuzz target (`fuzz/corpus/<target>/`)
//! through the same property the target checks, so each test run covers
//! it on the stable toolchain; a crash a fuzzer finds is added there.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use cavi_node::testkit::fuzz;

fn replay(target: &str, property: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| property(&data)).is_err() {
            panic!("{target}: {} breaks the property", path.display());
        }
        inputs += 1;
    }
    assert!(
        inputs >= 3,
        "{target}: only {inputs} seed inputs in {}",
        dir.display()
    );
}

#[test]
fn config_parse_corpus() {
    replay("config_parse", fuzz::config_parse);
}

#[test]
fn key_decode_corpus() {
    replay("key_decode", fuzz::key_decode);
}

#[test]
fn key_space_corpus() {
    replay("key_space", fuzz::key_space);
}

/// The properties are not vacuous: a few thousand pseudo-random inputs
/// (mutations of the corpus) run through them without a false alarm.
#[test]
fn mutated_corpus_inputs_hold_the_properties() {
    let mut rng = cavi_node::testkit::Rng(cavi_node::testkit::seed("CAVI_FUZZ_SEED"));
    for (target, property) in [
        ("config_parse", fuzz::config_parse as fn(&[u8])),
        ("key_decode", fuzz::key_decode),
        ("key_space", fuzz::key_space),
    ] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| std::fs::read(e.unwrap().path()).unwrap())
            .collect();
        for _ in 0..2000 {
            let mut data = seeds[rng.below(seeds.len() as u64) as usize].clone();
            for _ in 0..=rng.below(4) {
                let at = rng.below(data.len() as u64 + 1) as usize;
                match rng.below(3) {
                    0 if at < data.len() => data[at] = rng.below(256) as u8,
                    1 if at < data.len() => {
                        data.remove(at);
                    }
                    _ => data.insert(at, b"%aF+/\xff\x00-: {}[]\"m"[rng.below(16) as usize]),
                }
            }
            if std::panic::catch_unwind(|| property(&data)).is_err() {
                panic!(
                    "{target}: {:?} breaks the property",
                    String::from_utf8_lossy(&data)
                );
            }
        }
    }
}
