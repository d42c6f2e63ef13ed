//! The benches' plain-text tables: the first row is the header, columns are
//! two spaces apart, the first aligned left and the rest right.

use std::fmt::Write as _;

/// `rows` (the header first) as lines, each ending in a newline.
pub fn render<R: AsRef<[String]>>(rows: &[R]) -> String {
    let columns = rows.iter().map(|r| r.as_ref().len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.as_ref().get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, &w))| {
                if c == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align_under_the_widest_cell() {
        let rows = vec![
            vec!["proxy".to_string(), "µs".to_string()],
            vec!["udpshard".to_string(), "5.25".to_string()],
        ];
        assert_eq!(render(&rows), "proxy       µs\nudpshard  5.25\n");
    }
}
