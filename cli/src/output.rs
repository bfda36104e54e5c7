//! Plain aligned tables for people; scripts use `--json`.

use std::fmt;

/// Guest or tenant text made safe for a terminal: line breaks and tabs stay, every other
/// control character (escape sequences included) and every invisible direction or format
/// character becomes `?`.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\r' | '\t' => c,
            c if c.is_control() || palisade_common::api::is_invisible_format_char(c) => '?',
            c => c,
        })
        .collect()
}

/// Seconds as the largest whole unit: `365 days`, `12 h`, `90 s`.
pub fn duration(secs: u64) -> String {
    match secs {
        s if s % 86400 == 0 => format!("{} days", s / 86400),
        s if s % 3600 == 0 => format!("{} h", s / 3600),
        s if s % 60 == 0 => format!("{} min", s / 60),
        s => format!("{s} s"),
    }
}

#[derive(Default)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        // Cells come from the API: strip control characters so no value can move the cursor.
        let clean = |s: &str| printable(s).replace(['\n', '\r', '\t'], " ");
        self.rows
            .push(cells.into_iter().map(|c| clean(c.as_ref())).collect());
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|i| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(i))
                    .map(|c| c.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
                }
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_never_reach_the_terminal() {
        assert_eq!(printable("ok\x1b[2J\x07\r\n"), "ok?[2J?\r\n");
        assert_eq!(printable("a\u{202E}b\u{200B}c\u{2066}"), "a?b?c?");
        let mut t = Table::default();
        t.row(["a\x1b]0;pwned\x07", "b\nc"]);
        assert_eq!(t.to_string(), "a?]0;pwned?  b c\n");
    }
}
