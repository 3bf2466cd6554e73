//! CAVI operator (being written).
