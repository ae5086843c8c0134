//! Python behaviour that chat templates observe through transformers' Jinja environment:
//! `json.dumps` (the `tojson` filter), `repr()` (how Jinja prints a list or dict), and
//! `datetime.strftime` (the `strftime_now` function). Templates on the Hub are written against
//! these exact outputs, so they are reproduced here rather than approximated by Rust formatting.

use minijinja::value::{Value, ValueKind};
use minijinja::{Error as JinjaError, ErrorKind};
use std::fmt::Write;

/// Options of Python's `json.dumps` that transformers' `tojson` filter exposes.
pub struct JsonOptions {
    pub ensure_ascii: bool,
    /// `None`: one line; `Some(s)`: newline before each item, `s` repeated per nesting level.
    pub indent: Option<String>,
    pub item_separator: String,
    pub key_separator: String,
    pub sort_keys: bool,
}

impl JsonOptions {
    /// Python's defaults: `", "` between items unless indenting (then `","`), `": "` after keys.
    pub fn new(indent: Option<String>) -> JsonOptions {
        let item_separator = if indent.is_some() { "," } else { ", " };
        JsonOptions {
            ensure_ascii: false,
            indent,
            item_separator: item_separator.to_string(),
            key_separator: ": ".to_string(),
            sort_keys: false,
        }
    }
}

/// `json.dumps(value, ...)` for a template value.
pub fn json_dumps(value: &Value, options: &JsonOptions) -> Result<String, JinjaError> {
    let mut out = String::new();
    write_json(&mut out, value, options, 0)?;
    Ok(out)
}

fn write_json(
    out: &mut String,
    value: &Value,
    opt: &JsonOptions,
    depth: usize,
) -> Result<(), JinjaError> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value, true),
        ValueKind::String => {
            write_json_string(out, value.as_str().unwrap_or_default(), opt.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items = printable_items(value)?;
            write_json_container(out, '[', ']', items.len(), opt, depth, |out, i| {
                write_json(out, &items[i], opt, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key)?, item));
            }
            if opt.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_json_container(out, '{', '}', entries.len(), opt, depth, |out, i| {
                write_json_string(out, &entries[i].0, opt.ensure_ascii);
                out.push_str(&opt.key_separator);
                write_json(out, &entries[i].1, opt, depth + 1)
            })?;
        }
        ValueKind::Undefined => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                "tojson: an undefined value is not JSON serializable",
            ))
        }
        other => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: a {other} is not JSON serializable"),
            ))
        }
    }
    Ok(())
}

/// Writes `open item sep item ... close`, with Python's newline + indent layout when indenting.
fn write_json_container(
    out: &mut String,
    open: char,
    close: char,
    len: usize,
    opt: &JsonOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, usize) -> Result<(), JinjaError>,
) -> Result<(), JinjaError> {
    out.push(open);
    if len == 0 {
        out.push(close);
        return Ok(());
    }
    for i in 0..len {
        if i > 0 {
            out.push_str(&opt.item_separator);
        }
        if let Some(indent) = &opt.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, i)?;
    }
    if let Some(indent) = &opt.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// JSON object keys: Python converts None/bool/number keys to their JSON spelling.
fn json_key(key: &Value) -> Result<String, JinjaError> {
    Ok(match key.kind() {
        ValueKind::String => key.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Bool => (if key.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key, true);
            s
        }
        other => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be str, not {other}"),
            ))
        }
    })
}

/// Integers as decimal; floats as Python's `repr(float)` (`NaN`/`Infinity` in JSON, `nan`/`inf` in repr).
fn write_number(out: &mut String, value: &Value, json: bool) {
    if value.is_integer() {
        let _ = write!(out, "{value}");
        return;
    }
    let x = f64::try_from(value.clone()).unwrap_or(f64::NAN);
    if x.is_nan() {
        out.push_str(if json { "NaN" } else { "nan" });
    } else if x.is_infinite() {
        let sign = if x < 0.0 { "-" } else { "" };
        let _ = write!(out, "{sign}{}", if json { "Infinity" } else { "inf" });
    } else {
        out.push_str(&python_float_repr(x));
    }
}

/// `repr(x)` for a finite float: the shortest digits that round-trip (Rust's `{:e}` gives those),
/// fixed notation when the decimal exponent is in [-4, 16), else `d.ddde+XX`.
pub fn python_float_repr(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let sci = format!("{:e}", x.abs());
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if x < 0.0 { "-" } else { "" };
    if (-4..16).contains(&exponent) {
        let point = exponent + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{exp_sign}{:02}", exponent.abs())
    }
}

/// A JSON string literal with Python's escaping (`\uXXXX` in lowercase hex, surrogate pairs).
fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{:04x}", unit);
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr()` of a template value, which is what Jinja prints for `{{ some_list }}`.
/// The most items one printed sequence may hold.
const MAX_PRINTED_ITEMS: usize = 1 << 20;

/// The items of a sequence to print. A repeated sequence (`[x] * n`) is lazy: printing 10**12
/// items, or an empty sequence repeated 10**18 times, would never end, and its length is known
/// without iterating, so such a sequence is refused up front.
fn printable_items(value: &Value) -> Result<Vec<Value>, JinjaError> {
    let too_long = |n: usize| {
        JinjaError::new(
            ErrorKind::InvalidOperation,
            format!("cannot print a sequence of {n} items (at most {MAX_PRINTED_ITEMS})"),
        )
    };
    match value.len() {
        Some(0) => return Ok(Vec::new()),
        Some(n) if n > MAX_PRINTED_ITEMS => return Err(too_long(n)),
        _ => {}
    }
    let items: Vec<Value> = value.try_iter()?.take(MAX_PRINTED_ITEMS + 1).collect();
    if items.len() > MAX_PRINTED_ITEMS {
        return Err(too_long(items.len()));
    }
    Ok(items)
}

pub fn python_repr(value: &Value) -> Result<String, JinjaError> {
    let mut out = String::new();
    write_repr(&mut out, value)?;
    Ok(out)
}

fn write_repr(out: &mut String, value: &Value) -> Result<(), JinjaError> {
    match value.kind() {
        ValueKind::None => out.push_str("None"),
        ValueKind::Undefined => {}
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => write_number(out, value, false),
        ValueKind::String => write_repr_string(out, value.as_str().unwrap_or_default()),
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in printable_items(value)?.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(out, item)?;
            }
            out.push(']');
        }
        ValueKind::Map => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_repr(out, &key)?;
                out.push_str(": ");
                write_repr(out, &value.get_item(&key)?)?;
            }
            out.push('}');
        }
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// `repr(str)`: single quotes unless the text has a `'` and no `"`; non-printable characters escaped.
fn write_repr_string(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !is_python_printable(c) => {
                let code = c as u32;
                let _ = if code <= 0xff {
                    write!(out, "\\x{code:02x}")
                } else if code <= 0xffff {
                    write!(out, "\\u{code:04x}")
                } else {
                    write!(out, "\\U{code:08x}")
                };
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

/// `str.isprintable()` without the full Unicode tables: control characters, separators other than
/// the ASCII space, format characters and private-use / non-characters are not printable. Covers
/// every character that commonly appears in chat text; rare unassigned code points print as-is.
fn is_python_printable(c: char) -> bool {
    let code = c as u32;
    let unprintable = c.is_control()
        || matches!(code, 0xa0 | 0xad | 0x1680 | 0x180e | 0x2000..=0x200f | 0x2028..=0x202f)
        || matches!(code, 0x205f..=0x2064 | 0x2066..=0x206f | 0x3000 | 0xfeff | 0xfff9..=0xfffb)
        || matches!(
            code,
            0x600..=0x605 | 0x61c | 0x6dd | 0x70f | 0x8e2 | 0x110bd | 0x110cd
        )
        || matches!(code, 0xe000..=0xf8ff | 0xf0000..=0x10ffff | 0xe0001 | 0xe0020..=0xe007f)
        || (code & 0xfffe) == 0xfffe
        || (0xfdd0..=0xfdef).contains(&code);
    !unprintable
}

const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A broken-down UTC time.
struct CivilTime {
    year: i64,
    month: u32, // 1..=12
    day: u32,   // 1..=31
    hour: u32,
    minute: u32,
    second: u32,
    weekday: u32,     // 0 = Sunday
    day_of_year: u32, // 1..=366
}

fn civil_from_unix(unix_seconds: i64) -> CivilTime {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400) as u32;
    // Days since 1970-01-01 -> (year, month, day), the proleptic Gregorian calendar algorithm
    // that counts from 0000-03-01 so that leap days fall at the end of each year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_march = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_march + 2) / 153;
    let day = (doy_march - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let day_of_year = CUMULATIVE[month as usize - 1] + day + u32::from(leap && month > 2);
    CivilTime {
        year,
        month,
        day,
        hour: secs / 3600,
        minute: secs / 60 % 60,
        second: secs % 60,
        weekday: (days + 4).rem_euclid(7) as u32, // 1970-01-01 was a Thursday
        day_of_year,
    }
}

/// `datetime.strftime(format)` for a naive UTC time: the C89 directives plus glibc's `%-d`
/// style (no padding) and `%e`; `%Z`/`%z` are empty as for a naive datetime.
pub fn strftime_utc(format: &str, unix_seconds: i64) -> String {
    let t = civil_from_unix(unix_seconds);
    let mut out = String::new();
    let mut chars = format.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let no_pad = chars.peek() == Some(&'-');
        if no_pad {
            chars.next();
        }
        let Some(directive) = chars.next() else {
            out.push('%');
            break;
        };
        let num = |out: &mut String, value: i64, width: usize, pad: char| {
            if no_pad {
                let _ = write!(out, "{value}");
            } else if pad == ' ' {
                let _ = write!(out, "{value:>width$}");
            } else {
                let _ = write!(out, "{value:0width$}");
            }
        };
        let hour12 = if t.hour % 12 == 0 { 12 } else { t.hour % 12 };
        match directive {
            'a' => out.push_str(&WEEKDAYS[t.weekday as usize][..3]),
            'A' => out.push_str(WEEKDAYS[t.weekday as usize]),
            'b' | 'h' => out.push_str(&MONTHS[t.month as usize - 1][..3]),
            'B' => out.push_str(MONTHS[t.month as usize - 1]),
            'c' => out.push_str(&strftime_utc("%a %b %e %H:%M:%S %Y", unix_seconds)),
            'd' => num(&mut out, t.day.into(), 2, '0'),
            'e' => num(&mut out, t.day.into(), 2, ' '),
            'H' => num(&mut out, t.hour.into(), 2, '0'),
            'I' => num(&mut out, hour12.into(), 2, '0'),
            'j' => num(&mut out, t.day_of_year.into(), 3, '0'),
            'm' => num(&mut out, t.month.into(), 2, '0'),
            'M' => num(&mut out, t.minute.into(), 2, '0'),
            'S' => num(&mut out, t.second.into(), 2, '0'),
            'p' => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            'y' => num(&mut out, t.year.rem_euclid(100), 2, '0'),
            'Y' => {
                let _ = write!(out, "{}", t.year);
            }
            'w' => num(&mut out, t.weekday.into(), 1, '0'),
            'u' => num(
                &mut out,
                if t.weekday == 0 { 7 } else { t.weekday.into() },
                1,
                '0',
            ),
            'D' => out.push_str(&strftime_utc("%m/%d/%y", unix_seconds)),
            'F' => out.push_str(&strftime_utc("%Y-%m-%d", unix_seconds)),
            'T' => out.push_str(&strftime_utc("%H:%M:%S", unix_seconds)),
            'R' => out.push_str(&strftime_utc("%H:%M", unix_seconds)),
            'Z' | 'z' => {}
            'n' => out.push('\n'),
            't' => out.push('\t'),
            '%' => out.push('%'),
            other => {
                out.push('%');
                if no_pad {
                    out.push('-');
                }
                out.push(other);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_repr_matches_python_rules() {
        // Python: repr(1.0), repr(0.1), repr(1e16), repr(1e-5), repr(123456.789), repr(-2.5e-7)
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1e16), "1e+16");
        assert_eq!(python_float_repr(1e15), "1000000000000000.0");
        assert_eq!(python_float_repr(1e-5), "1e-05");
        assert_eq!(python_float_repr(0.0001), "0.0001");
        assert_eq!(python_float_repr(123456.789), "123456.789");
        assert_eq!(python_float_repr(-2.5e-7), "-2.5e-07");
    }

    #[test]
    fn civil_dates_cover_leap_years_and_negative_times() {
        let t = civil_from_unix(951_782_400); // 2000-02-29
        assert_eq!(
            (t.year, t.month, t.day, t.day_of_year, t.weekday),
            (2000, 2, 29, 60, 2)
        );
        let t = civil_from_unix(-1); // 1969-12-31 23:59:59, a Wednesday
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.weekday),
            (1969, 12, 31, 23, 3)
        );
    }
}
