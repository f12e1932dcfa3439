//! The one table: a figure, its value, its ceiling and ratio, its target and whether it is met.

use std::fmt::Write as _;

/// How a value is printed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unit {
    PerSec(&'static str),
    Ms,
    Bytes,
    Percent,
    Plain(&'static str),
}

/// A target from the issue.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    AtLeast(f64),
    AtMost(f64),
    /// At least this fraction of the ceiling.
    RatioAtLeast(f64),
}

#[derive(Debug, Clone)]
pub struct Row {
    pub section: u8,
    pub figure: String,
    pub value: Result<f64, String>,
    pub unit: Unit,
    /// (label, value) of the ceiling this figure is compared with.
    pub ceiling: Option<(String, f64)>,
    pub target: Option<Target>,
    pub note: String,
}

impl Row {
    pub fn new(section: u8, figure: impl Into<String>, value: f64, unit: Unit) -> Self {
        Self {
            section,
            figure: figure.into(),
            value: Ok(value),
            unit,
            ceiling: None,
            target: None,
            note: String::new(),
        }
    }

    /// A figure that could not be measured.
    pub fn failed(section: u8, figure: impl Into<String>, error: &anyhow::Error) -> Self {
        let message = format!("{error:#}").replace('\n', " ").replace('|', "/");
        let mut row = Self::new(section, figure, 0.0, Unit::Plain(""));
        row.value = Err(message.chars().take(160).collect());
        row
    }

    /// Compares the figure with a ceiling (none when the ceiling was not measured).
    pub fn ceiling(mut self, label: &str, value: f64) -> Self {
        self.ceiling = (value > 0.0).then(|| (label.to_string(), value));
        self
    }

    pub fn target(mut self, t: Target) -> Self {
        self.target = Some(t);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = note.into();
        self
    }

    fn ratio(&self) -> Option<f64> {
        match (&self.value, &self.ceiling) {
            (Ok(v), Some((_, c))) if *c > 0.0 => Some(v / c),
            _ => None,
        }
    }

    /// `None` when the figure has no target.
    pub fn met(&self) -> Option<bool> {
        let v = *self.value.as_ref().ok()?;
        Some(match self.target? {
            Target::AtLeast(t) => v >= t,
            Target::AtMost(t) => v <= t,
            Target::RatioAtLeast(t) => self.ratio()? >= t,
        })
    }

    pub fn target_text(&self) -> String {
        match self.target {
            None => "—".into(),
            Some(Target::AtLeast(t)) => format!("≥ {}", format_value(t, self.unit)),
            Some(Target::AtMost(t)) => format!("≤ {}", format_value(t, self.unit)),
            Some(Target::RatioAtLeast(t)) => format!("≥ {t}× ceiling"),
        }
    }
}

pub fn format_value(v: f64, unit: Unit) -> String {
    match unit {
        Unit::PerSec(what) => format!("{} {what}/s", thousands(v)),
        Unit::Ms => {
            if v < 10.0 {
                format!("{v:.2} ms")
            } else {
                format!("{} ms", thousands(v))
            }
        }
        Unit::Bytes => {
            if v >= 1024.0 * 1024.0 {
                format!("{:.1} MB", v / (1024.0 * 1024.0))
            } else {
                format!("{:.1} KB", v / 1024.0)
            }
        }
        Unit::Percent => format!("{v:.1}%"),
        Unit::Plain(what) => {
            if v.fract() == 0.0 && v.abs() < 1e15 {
                format!("{} {what}", thousands(v)).trim_end().to_string()
            } else {
                format!("{v:.3} {what}").trim_end().to_string()
            }
        }
    }
}

/// 12345.6 → "12,346".
fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The table, as Markdown (readable in a terminal too).
pub fn table(rows: &[Row]) -> String {
    let mut rows: Vec<&Row> = rows.iter().collect();
    rows.sort_by_key(|r| r.section); // stable: keeps the order within a section
    let mut out = String::new();
    out.push_str("| # | figure | value | ceiling | × ceiling | target | met? |\n");
    out.push_str("|---|---|---:|---:|---:|---|---|\n");
    for r in rows {
        let value = match &r.value {
            Ok(v) => format_value(*v, r.unit),
            Err(e) => format!("FAILED: {e}"),
        };
        let ceiling = match &r.ceiling {
            Some((label, c)) => format!("{} ({label})", format_value(*c, r.unit)),
            None => "—".into(),
        };
        let ratio = r.ratio().map_or("—".into(), |x| format!("{x:.2}×"));
        let met = match r.met() {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let figure = if r.note.is_empty() {
            r.figure.clone()
        } else {
            format!("{} ({})", r.figure, r.note)
        };
        let figure = figure.replace('|', "/").replace('\n', " ");
        let _ = writeln!(
            out,
            "| {} | {figure} | {value} | {ceiling} | {ratio} | {} | {met} |",
            r.section,
            r.target_text()
        );
    }
    out
}
