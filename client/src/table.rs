//! Plain-text tables for humans: left-aligned columns two spaces apart, a
//! header row, control characters escaped so every row stays one line.

/// A table of text cells.
#[derive(Debug, Clone, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Column widths fixed by the first streamed page.
    widths: Option<Vec<usize>>,
}

impl Table {
    pub fn new<const N: usize>(header: [&str; N]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
            widths: None,
        }
    }

    /// Adds a row; its cells are escaped with [`cell`].
    pub fn push<I, S>(&mut self, row: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.rows
            .push(row.into_iter().map(|c| cell(c.as_ref())).collect());
    }

    /// Drops the rows (after a streamed page was printed).
    pub fn clear_rows(&mut self) {
        self.rows.clear();
    }

    fn widths(&self) -> Vec<usize> {
        let columns = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.header.len()])
            .max()
            .unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in row.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        widths
    }

    /// The table, one line per row, each line ending in `\n`; the last
    /// column is not padded.
    pub fn render(&self) -> String {
        self.lines(&self.widths(), true)
    }

    /// The rows pushed since the last call, for output that streams: the
    /// first call (with the header) fixes the column widths for the rest.
    pub fn render_from(&mut self, header: bool) -> String {
        let widths = match &self.widths {
            Some(w) => w.clone(),
            None => {
                let w = self.widths();
                self.widths = Some(w.clone());
                w
            }
        };
        self.lines(&widths, header)
    }

    fn lines(&self, widths: &[usize], header: bool) -> String {
        let mut out = String::new();
        let head = header.then_some(&self.header);
        for row in head.into_iter().chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(c);
                if i + 1 < row.len() {
                    let pad = widths
                        .get(i)
                        .copied()
                        .unwrap_or(0)
                        .saturating_sub(c.chars().count());
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// A cell's text with control characters escaped (`\n`, `\t`, `\u{1b}`),
/// so a value holding a newline cannot break the table.
pub fn cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A shard's range for humans: `a..m*` (every key from `a` through the
/// keys starting with `m`), `(lowest)..m*`, `n..(highest)`. A bound that
/// holds spaces, control characters, `..`, `*`, quotes or parentheses is
/// shown quoted, so every bound reads back unambiguously.
pub fn range_label(start: &str, end: Option<&str>) -> String {
    let start = if start.is_empty() {
        "(lowest)".to_owned()
    } else {
        bound(start)
    };
    match end {
        Some(end) => format!("{start}..{}*", bound(end)),
        None => format!("{start}..(highest)"),
    }
}

fn bound(text: &str) -> String {
    let plain = !text.is_empty()
        && !text.contains("..")
        && !text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "\"'*()\\".contains(c));
    if plain {
        text.to_owned()
    } else {
        format!("{text:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up_and_the_last_is_not_padded() {
        let mut t = Table::new(["KEY", "VALUE"]);
        t.push(["apple", "red"]);
        t.push(["é", "multi\nline\t"]);
        t.push(["kiwi", ""]);
        assert_eq!(
            t.render(),
            "KEY    VALUE\napple  red\né      multi\\nline\\t\nkiwi\n"
        );
    }

    #[test]
    fn an_empty_table_is_its_header() {
        assert_eq!(Table::new(["KEY", "VALUE"]).render(), "KEY  VALUE\n");
    }

    #[test]
    fn ranges_read_like_the_key_space_rule() {
        assert_eq!(range_label("a", Some("m")), "a..m*");
        assert_eq!(range_label("", Some("m")), "(lowest)..m*");
        assert_eq!(range_label("n", None), "n..(highest)");
        assert_eq!(range_label("", None), "(lowest)..(highest)");
        assert_eq!(range_label("a b", Some("m*")), "\"a b\"..\"m*\"*");
        assert_eq!(range_label("über", Some("zz")), "über..zz*");
    }
}
