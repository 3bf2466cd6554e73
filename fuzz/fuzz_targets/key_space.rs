//! Fuzz target: the property [`cavi_node::testkit::fuzz::key_space`].
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cavi_node::testkit::fuzz::key_space(data));
