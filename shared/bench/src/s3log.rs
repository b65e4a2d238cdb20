//! S3 requests by kind, counted from the test S3 server's access log.
//!
//! `scripts/services.sh` runs moto with its access log in `$TALLY_CACHE/run/moto.log`,
//! in UTC (`TZ=UTC`): one line per request,
//! `127.0.0.1 - - [06/Dec/2026 02:40:01] "PUT /bucket/streams/acc/1.json HTTP/1.1" 200 -`.
//! A load level's window (whole seconds, both ends included) and its bucket select the
//! requests it caused; each is named by its method and the first part of its key
//! (`PUT streams`, `GET outbox`, `LIST outbox`, `DeleteObjects`, …).

use std::collections::BTreeMap;
use std::path::Path;
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time};

/// The requests to `bucket` logged from `from` to `to` (both rounded to the second and
/// included), by kind.
pub fn count(
    log: &Path,
    bucket: &str,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> std::io::Result<BTreeMap<String, u64>> {
    let text = std::fs::read(log)?;
    let text = String::from_utf8_lossy(&text);
    let (from, to) = (from.unix_timestamp(), to.unix_timestamp());
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        let line = without_colours(line);
        let Some((at, method, path)) = parse_line(&line) else {
            continue;
        };
        if !(from..=to).contains(&at.unix_timestamp()) {
            continue;
        }
        if let Some(kind) = kind(bucket, method, path) {
            *counts.entry(kind).or_insert(0) += 1;
        }
    }
    Ok(counts)
}

/// `line` without its terminal colour codes (`ESC [ … m`: werkzeug colours a line by
/// its status).
fn without_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// When, which method, which path; `None` for a line that is not a request.
fn parse_line(line: &str) -> Option<(OffsetDateTime, &str, &str)> {
    let open = line.find('[')?;
    let close = open + line[open..].find(']')?;
    let at = parse_time(&line[open + 1..close])?;
    let request = line[close..].split('"').nth(1)?;
    let mut parts = request.split(' ');
    let (method, path) = (parts.next()?, parts.next()?);
    Some((at, method, path))
}

/// `06/Dec/2026 02:40:01`, in UTC.
fn parse_time(text: &str) -> Option<OffsetDateTime> {
    let (date, clock) = text.split_once(' ')?;
    let mut d = date.split('/');
    let day: u8 = d.next()?.parse().ok()?;
    let month = match d.next()? {
        "Jan" => Month::January,
        "Feb" => Month::February,
        "Mar" => Month::March,
        "Apr" => Month::April,
        "May" => Month::May,
        "Jun" => Month::June,
        "Jul" => Month::July,
        "Aug" => Month::August,
        "Sep" => Month::September,
        "Oct" => Month::October,
        "Nov" => Month::November,
        "Dec" => Month::December,
        _ => return None,
    };
    let year: i32 = d.next()?.parse().ok()?;
    let mut c = clock.split(':');
    let (h, m, s): (u8, u8, u8) = (
        c.next()?.parse().ok()?,
        c.next()?.parse().ok()?,
        c.next()?.get(..2)?.parse().ok()?,
    );
    let date = Date::from_calendar_date(year, month, day).ok()?;
    let time = Time::from_hms(h, m, s).ok()?;
    Some(PrimitiveDateTime::new(date, time).assume_utc())
}

/// The kind of a request to `bucket`: `None` for another bucket's.
fn kind(bucket: &str, method: &str, path: &str) -> Option<String> {
    let rest = path.strip_prefix('/')?.strip_prefix(bucket)?;
    if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
        return None;
    }
    let rest = rest.trim_start_matches('/');
    if rest.is_empty() || rest.starts_with('?') {
        if method == "POST" && rest.contains("delete") {
            return Some("DeleteObjects".into());
        }
        if method != "GET" {
            return Some(format!("{method} bucket"));
        }
        // `prefix=snapshots/acc/` or `prefix=snapshots%2Facc%2F`: its first part.
        let area = rest
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("prefix="))
            .map(|p| p.split(['/', '%']).next().unwrap_or(p))
            .unwrap_or("");
        return Some(format!("LIST {area}").trim_end().to_owned());
    }
    let area = rest.split(['/', '?']).next().unwrap_or(rest);
    Some(format!("{method} {area}"))
}

/// Requests per command: every request in the window over the commands acknowledged in
/// it.
pub fn per_command(counts: &BTreeMap<String, u64>, commands: u64) -> f64 {
    counts.values().sum::<u64>() as f64 / commands.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_kind_within_the_window_and_the_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("moto.log");
        std::fs::write(
            &log,
            "\
127.0.0.1 - - [06/Dec/2026 02:40:00] \"PUT /b/streams/acc/00000000000000000001.json HTTP/1.1\" 200 -
127.0.0.1 - - [06/Dec/2026 02:40:01] \"PUT /b/streams/acc/00000000000000000002.json HTTP/1.1\" 412 -
127.0.0.1 - - [06/Dec/2026 02:40:01] \"\u{1b}[33mPUT /b/outbox/~ab-000000000001 HTTP/1.1\u{1b}[0m\" 200 -
127.0.0.1 - - [06/Dec/2026 02:40:01] \"GET /b?list-type=2&prefix=outbox%2F&max-keys=500 HTTP/1.1\" 200 -
127.0.0.1 - - [06/Dec/2026 02:40:01] \"GET /b?list-type=2&prefix=snapshots/acc/ HTTP/1.1\" 200 -
127.0.0.1 - - [06/Dec/2026 02:40:02] \"POST /b?delete HTTP/1.1\" 200 -
127.0.0.1 - - [06/Dec/2026 02:40:02] \"GET /b/streams/acc/00000000000000000003.json HTTP/1.1\" 404 -
127.0.0.1 - - [06/Dec/2026 02:40:02] \"GET /bb/streams/acc/00000000000000000003.json HTTP/1.1\" 404 -
127.0.0.1 - - [06/Dec/2026 02:40:03] \"PUT /b/streams/acc/00000000000000000004.json HTTP/1.1\" 200 -
a line that is not a request
",
        )
        .unwrap();
        let at = |s: u8| {
            PrimitiveDateTime::new(
                Date::from_calendar_date(2026, Month::December, 6).unwrap(),
                Time::from_hms(2, 40, s).unwrap(),
            )
            .assume_utc()
        };
        let counts = count(&log, "b", at(1), at(2)).unwrap();
        let expected: BTreeMap<String, u64> = [
            ("PUT streams", 1),
            ("PUT outbox", 1),
            ("LIST outbox", 1),
            ("LIST snapshots", 1),
            ("DeleteObjects", 1),
            ("GET streams", 1),
        ]
        .into_iter()
        .map(|(k, n)| (k.to_owned(), n))
        .collect();
        assert_eq!(counts, expected);
        assert_eq!(per_command(&counts, 2), 3.0);
    }
}
