//! The Prometheus protobuf exposition: length-delimited
//! `io.prometheus.client.MetricFamily` messages (client_model's
//! metrics.proto), which a Prometheus with native histograms enabled asks
//! for first. It carries what the text cannot: a histogram whose bucket
//! bounds are powers of two (the queue delay's) goes out as a native
//! histogram of schema 0 as well as with its classic buckets.
//!
//! Every family is the OpenMetrics text's, read back from it: one
//! exposition, two encodings, nothing to keep in step.

use std::collections::BTreeMap;

/// What Prometheus names in Accept for this encoding.
pub(crate) const MEDIA_TYPE: &str = "application/vnd.google.protobuf";
/// The Content-Type of the answer.
pub(crate) const CONTENT_TYPE: &str =
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited";

/// client_model's MetricType.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter = 0,
    Gauge = 1,
    Untyped = 3,
    Histogram = 4,
}

type Labels = Vec<(String, String)>;

/// One family of the text exposition.
#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    /// Counters and gauges: (labels, value) in order.
    values: Vec<(Labels, f64)>,
    /// Histograms by label set: sum, count, and (le, cumulative count).
    histograms: BTreeMap<Labels, Histogram>,
}

#[derive(Debug, Default)]
struct Histogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

/// The protobuf exposition of `text`, the OpenMetrics exposition
/// [`super::render`] wrote.
pub(crate) fn from_openmetrics(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for family in parse(text) {
        let msg = family_message(&family);
        varint(&mut out, msg.len() as u64);
        out.extend_from_slice(&msg);
    }
    out
}

fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.push(Family {
                name: name.to_string(),
                help: unescape(help),
                kind: Kind::Untyped,
                values: Vec::new(),
                histograms: BTreeMap::new(),
            });
            continue;
        }
        let Some(family) = families.last_mut() else {
            continue;
        };
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            family.kind = match rest.rsplit(' ').next() {
                Some("counter") => Kind::Counter,
                Some("gauge") => Kind::Gauge,
                Some("histogram") => Kind::Histogram,
                _ => Kind::Untyped,
            };
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let Some((name, mut labels, value)) = sample(line) else {
            continue;
        };
        let suffix = name.strip_prefix(family.name.as_str()).unwrap_or("");
        if family.kind != Kind::Histogram {
            // A counter's samples are `<family>_total`; protobuf names
            // the family as its samples are named.
            if family.kind == Kind::Counter && suffix == "_total" {
                family.name = name.to_string();
            }
            family.values.push((labels, value));
            continue;
        }
        let le = labels
            .iter()
            .position(|(k, _)| k == "le")
            .map(|i| labels.remove(i).1);
        let h = family.histograms.entry(labels).or_default();
        match (suffix, le) {
            ("_sum", _) => h.sum = value,
            ("_count", _) => h.count = value as u64,
            ("_bucket", Some(le)) => {
                let bound = match le.as_str() {
                    "+Inf" => f64::INFINITY,
                    other => other.parse().unwrap_or(f64::NAN),
                };
                h.buckets.push((bound, value as u64));
            }
            _ => {}
        }
    }
    families
}

/// `name{k="v",...} value` (or `name value`).
fn sample(line: &str) -> Option<(&str, Labels, f64)> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => return None,
    };
    let (labels, value) = match rest.strip_prefix('{') {
        Some(body) => {
            let (labels, after) = label_set(body)?;
            (labels, after)
        }
        None => (Vec::new(), rest),
    };
    let value = value.trim();
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other.parse().ok()?,
    };
    Some((name, labels, value))
}

/// The labels up to the closing brace, and what follows it.
fn label_set(body: &str) -> Option<(Labels, &str)> {
    let mut labels = Vec::new();
    let mut rest = body;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key.trim_start_matches(',').to_string(), value));
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match (c, c == '\\') {
            (_, true) => match chars.next() {
                Some('n') => out.push('\n'),
                Some(other) => out.push(other),
                None => out.push('\\'),
            },
            (c, false) => out.push(c),
        }
    }
    out
}

fn family_message(f: &Family) -> Vec<u8> {
    let mut m = Vec::new();
    string(&mut m, 1, &f.name);
    string(&mut m, 2, &f.help);
    key(&mut m, 3, VARINT);
    varint(&mut m, f.kind as u64);
    let metrics = f.values.iter().map(|(labels, v)| {
        let mut metric = Vec::new();
        label_pairs(&mut metric, labels);
        // Metric: gauge = 2, counter = 3, untyped = 5; each { double value = 1 }.
        let field = match f.kind {
            Kind::Counter => 3,
            Kind::Gauge => 2,
            _ => 5,
        };
        let mut value = Vec::new();
        double(&mut value, 1, *v);
        bytes(&mut metric, field, &value);
        metric
    });
    let histograms = f.histograms.iter().map(|(labels, h)| {
        let mut metric = Vec::new();
        label_pairs(&mut metric, labels);
        bytes(&mut metric, 7, &histogram_message(h));
        metric
    });
    for metric in metrics.chain(histograms) {
        bytes(&mut m, 4, &metric);
    }
    m
}

fn label_pairs(metric: &mut Vec<u8>, labels: &Labels) {
    for (k, v) in labels {
        let mut pair = Vec::new();
        string(&mut pair, 1, k);
        string(&mut pair, 2, v);
        bytes(metric, 1, &pair);
    }
}

/// A histogram's classic buckets, and its native form where every finite
/// bound is a power of two: schema 0, the first bucket as the zero bucket
/// (its bound the zero threshold), bucket (2^(i-1), 2^i] at index i, and
/// what lies past the last bound in the next index up.
fn histogram_message(h: &Histogram) -> Vec<u8> {
    let mut m = Vec::new();
    key(&mut m, 1, VARINT);
    varint(&mut m, h.count);
    double(&mut m, 2, h.sum);
    for (bound, cumulative) in &h.buckets {
        let mut b = Vec::new();
        key(&mut b, 1, VARINT);
        varint(&mut b, *cumulative);
        double(&mut b, 2, *bound);
        bytes(&mut m, 3, &b);
    }
    let Some(native) = native(&h.buckets) else {
        return m;
    };
    key(&mut m, 5, VARINT);
    varint(&mut m, zigzag(0)); // schema
    double(&mut m, 6, native.zero_threshold);
    key(&mut m, 7, VARINT);
    varint(&mut m, native.zero_count);
    if !native.counts.is_empty() {
        // One span over every index from the first.
        let mut span = Vec::new();
        key(&mut span, 1, VARINT);
        varint(&mut span, zigzag(native.first));
        key(&mut span, 2, VARINT);
        varint(&mut span, native.counts.len() as u64);
        bytes(&mut m, 12, &span);
        // positive_delta: each count as the difference from the previous.
        let mut deltas = Vec::new();
        let mut prev = 0i64;
        for c in &native.counts {
            let c = *c as i64;
            varint(&mut deltas, zigzag(c - prev));
            prev = c;
        }
        bytes(&mut m, 13, &deltas);
    }
    m
}

struct Native {
    zero_threshold: f64,
    zero_count: u64,
    /// The index of `counts[0]`.
    first: i64,
    counts: Vec<u64>,
}

fn native(buckets: &[(f64, u64)]) -> Option<Native> {
    let (&(threshold, zero_count), rest) = buckets.split_first()?;
    let exponent = |b: f64| -> Option<i64> {
        let e = b.log2();
        (b > 0.0 && b.is_finite() && e == e.round()).then_some(e as i64)
    };
    let first = exponent(threshold)? + 1;
    let mut counts = Vec::with_capacity(rest.len());
    let mut below = zero_count;
    for (i, (bound, cumulative)) in rest.iter().enumerate() {
        let want = first + i as i64;
        if bound.is_finite() && exponent(*bound) != Some(want) {
            return None;
        }
        counts.push(cumulative.saturating_sub(below));
        below = *cumulative;
    }
    // Trailing empty buckets say nothing.
    while counts.last() == Some(&0) {
        counts.pop();
    }
    Some(Native {
        zero_threshold: threshold,
        zero_count,
        first,
        counts,
    })
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, u64::from(field) << 3 | u64::from(wire));
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn double(out: &mut Vec<u8>, field: u32, v: f64) {
    key(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, LEN);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    bytes(out, field, s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_read_back_from_the_text() {
        let text = concat!(
            "# HELP c Things.\n# TYPE c counter\nc_total{worker=\"0\"} 3\nc_total{worker=\"1\"} 4\n",
            "# HELP g A \\\"gauge\\\".\n# TYPE g gauge\ng{l=\"a\\\"b\\\\c\",m=\"x\"} 2.5\n",
            "# HELP h Waits.\n# TYPE h histogram\n",
            "h_sum{worker=\"0\"} 1.5\nh_count{worker=\"0\"} 6\n",
            "h_bucket{le=\"0.25\",worker=\"0\"} 1\nh_bucket{le=\"0.5\",worker=\"0\"} 1\n",
            "h_bucket{le=\"1.0\",worker=\"0\"} 4\nh_bucket{le=\"2.0\",worker=\"0\"} 5\n",
            "h_bucket{le=\"4.0\",worker=\"0\"} 5\nh_bucket{le=\"+Inf\",worker=\"0\"} 6\n",
            "# EOF\n",
        );
        let f = parse(text);
        assert_eq!(f.len(), 3);
        assert_eq!((f[0].name.as_str(), f[0].kind), ("c_total", Kind::Counter));
        assert_eq!(f[0].values.len(), 2);
        assert_eq!(f[0].values[1].1, 4.0);
        assert_eq!(f[1].help, "A \"gauge\".");
        assert_eq!(
            f[1].values[0].0,
            vec![
                ("l".to_string(), "a\"b\\c".to_string()),
                ("m".to_string(), "x".to_string())
            ]
        );
        let h = &f[2].histograms[&vec![("worker".to_string(), "0".to_string())]];
        assert_eq!((h.sum, h.count, h.buckets.len()), (1.5, 6, 6));
        let n = native(&h.buckets).expect("powers of two");
        assert_eq!((n.zero_threshold, n.zero_count), (0.25, 1));
        assert_eq!(n.first, -1, "(0.25, 0.5] is index -1");
        assert_eq!(n.counts, vec![0, 3, 1, 0, 1], "the last: past 4");
        assert!(native(&[(0.3, 1), (0.6, 2)]).is_none());
    }

    #[test]
    fn the_wire_format_is_protobuf() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        assert_eq!(zigzag(0), 0);
        assert_eq!(zigzag(-1), 1);
        assert_eq!(zigzag(1), 2);
        assert_eq!(zigzag(-2), 3);
        let out = from_openmetrics("# HELP g G.\n# TYPE g gauge\ng 1.0\n# EOF\n");
        // One delimited MetricFamily { name "g", help "G.", type GAUGE,
        // metric { gauge { value 1.0 } } }.
        let mut want = vec![
            0x0a, 1, b'g', 0x12, 2, b'G', b'.', 0x18, 1, 0x22, 11, 0x12, 9, 0x09,
        ];
        want.extend_from_slice(&1.0f64.to_le_bytes());
        want.insert(0, want.len() as u8);
        assert_eq!(out, want);
    }
}
