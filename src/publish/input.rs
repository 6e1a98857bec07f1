//! Input readers for `fleetcast publish`: NDJSON, CSV and GPX text to fix objects, each with the
//! line it came from.
//!
//! Pure: bytes in, records or a located error out. The readers check only the shape of the
//! input (a JSON object per line, numbers where CSV and GPX need numbers); the server validates
//! every field and answers for each fix.

use std::fmt;
use std::path::Path;

use serde_json::{Map, Number, Value};

/// One fix to send: the JSON object and the input line it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line of the input where the fix starts; `None` for generated fixes.
    pub line: Option<usize>,
    /// The fix, as the server reads it (`id`, `lat`, `lon`, ...).
    pub fix: Map<String, Value>,
}

/// A layout of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON fix object per line; blank lines are skipped.
    Ndjson,
    /// Comma-separated values with a header line naming the columns.
    Csv,
    /// GPS Exchange Format: each track's name is the car's id.
    Gpx,
}

impl Format {
    /// The format a file name implies: `.csv`, `.gpx`, anything else (and stdin) NDJSON.
    pub fn from_path(path: Option<&Path>) -> Format {
        let ext = path
            .and_then(Path::extension)
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("csv") => Format::Csv,
            Some("gpx") => Format::Gpx,
            _ => Format::Ndjson,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Ndjson => "NDJSON",
            Format::Csv => "CSV",
            Format::Gpx => "GPX",
        })
    }
}

/// An input that cannot be read, and the 1-based line where it broke.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("line {line}: {kind}")]
pub struct InputError {
    /// 1-based line of the input.
    pub line: usize,
    /// What is wrong there.
    pub kind: InputErrorKind,
}

/// What is wrong with an input line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InputErrorKind {
    /// The bytes are not UTF-8.
    #[error("not UTF-8 text")]
    NotUtf8,
    /// A line is not valid JSON.
    #[error("column {column}: {message}")]
    Json {
        /// 1-based column of the line.
        column: usize,
        /// What the JSON parser said.
        message: String,
    },
    /// A line is valid JSON but not an object.
    #[error("expected a fix object {{\"id\": ..., \"lat\": ..., \"lon\": ...}}, found {0}")]
    NotAnObject(&'static str),
    /// The CSV header line is missing or names wrong columns.
    #[error("{0}")]
    CsvHeader(String),
    /// A CSV row has more or fewer fields than the header.
    #[error("{found} fields, but the header has {expected}")]
    FieldCount {
        /// Fields in this row.
        found: usize,
        /// Columns in the header.
        expected: usize,
    },
    /// A CSV field's quotes are wrong.
    #[error("{0}")]
    CsvQuote(String),
    /// A required CSV cell is empty.
    #[error("column {column} ({name}) is empty: id, lat and lon are required")]
    MissingValue {
        /// 1-based column.
        column: usize,
        /// The column's name.
        name: &'static str,
    },
    /// A CSV cell that must be a number is not one.
    #[error("column {column} ({name}): {text:?} is not a number")]
    BadNumber {
        /// 1-based column.
        column: usize,
        /// The column's name.
        name: &'static str,
        /// The text found.
        text: String,
    },
    /// A GPX attribute or element that must be a number is not one.
    #[error("{name}: {text:?} is not a number")]
    GpxNumber {
        /// The attribute or element name.
        name: &'static str,
        /// The text found.
        text: String,
    },
    /// The GPX document is malformed or lacks what a track needs.
    #[error("{0}")]
    Gpx(String),
}

impl InputError {
    fn new(line: usize, kind: InputErrorKind) -> Self {
        Self { line, kind }
    }
}

/// Reads every fix of `bytes` in `format`. Any error stops the whole input.
pub fn read(bytes: &[u8], format: Format) -> Result<Vec<Record>, InputError> {
    let text = utf8(bytes)?;
    match format {
        Format::Ndjson => read_ndjson(text),
        Format::Csv => read_csv(text),
        Format::Gpx => read_gpx(text),
    }
}

/// The text without a byte-order mark, or the line of the first byte that is not UTF-8.
fn utf8(bytes: &[u8]) -> Result<&str, InputError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count();
        InputError::new(line, InputErrorKind::NotUtf8)
    })?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text))
}

/// NDJSON: each non-blank line one JSON object, passed through as given.
pub fn read_ndjson(text: &str) -> Result<Vec<Record>, InputError> {
    let mut out = Vec::new();
    for (n, line) in text.split('\n').enumerate() {
        let line_no = n + 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line).map_err(|e| {
            let msg = e.to_string();
            let message = msg
                .rfind(" at line ")
                .map_or(msg.as_str(), |i| &msg[..i])
                .to_string();
            InputError::new(
                line_no,
                InputErrorKind::Json {
                    column: e.column(),
                    message,
                },
            )
        })?;
        match value {
            Value::Object(fix) => out.push(Record {
                line: Some(line_no),
                fix,
            }),
            other => {
                return Err(InputError::new(
                    line_no,
                    InputErrorKind::NotAnObject(json_kind(&other)),
                ))
            }
        }
    }
    Ok(out)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A CSV column fleetcast knows, and how its cells become JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Id,
    Lat,
    Lon,
    Heading,
    Speed,
    Time,
    Label,
}

impl Column {
    const ALL: [Column; 7] = [
        Column::Id,
        Column::Lat,
        Column::Lon,
        Column::Heading,
        Column::Speed,
        Column::Time,
        Column::Label,
    ];

    /// The column's name, which is also the fix's field name.
    fn name(self) -> &'static str {
        match self {
            Column::Id => "id",
            Column::Lat => "lat",
            Column::Lon => "lon",
            Column::Heading => "heading_deg",
            Column::Speed => "speed_mps",
            Column::Time => "time",
            Column::Label => "label",
        }
    }

    fn required(self) -> bool {
        matches!(self, Column::Id | Column::Lat | Column::Lon)
    }

    fn numeric(self) -> bool {
        matches!(
            self,
            Column::Lat | Column::Lon | Column::Heading | Column::Speed
        )
    }
}

/// One CSV row: the line it starts on and its fields.
#[derive(Debug, PartialEq)]
struct Row {
    line: usize,
    fields: Vec<String>,
}

/// Splits CSV text into rows (RFC 4180: `"` quotes a field, `""` is a quote inside one, and a
/// quoted field may hold commas and line breaks). Blank lines are skipped; spaces around
/// unquoted fields are trimmed.
fn csv_rows(text: &str) -> Result<Vec<Row>, InputError> {
    let mut rows = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    loop {
        let row_line = line;
        let mut fields = Vec::new();
        // One row: fields until an unquoted line break or the end.
        let ended = loop {
            while chars.next_if(|&c| c == ' ' || c == '\t').is_some() {}
            let mut field = String::new();
            if chars.next_if_eq(&'"').is_some() {
                let opened = line;
                loop {
                    match chars.next() {
                        None => {
                            return Err(InputError::new(
                                opened,
                                InputErrorKind::CsvQuote("a quoted field is never closed".into()),
                            ))
                        }
                        Some('"') if chars.next_if_eq(&'"').is_some() => field.push('"'),
                        Some('"') => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            field.push(c);
                        }
                    }
                }
                while chars.next_if(|&c| c == ' ' || c == '\t').is_some() {}
                if !matches!(chars.peek(), None | Some(',' | '\n' | '\r')) {
                    return Err(InputError::new(
                        line,
                        InputErrorKind::CsvQuote(
                            "text after a closing quote: quote the whole field and double \
                             any quote inside it"
                                .into(),
                        ),
                    ));
                }
            } else {
                while let Some(c) = chars.next_if(|&c| !matches!(c, ',' | '\n' | '\r')) {
                    if c == '"' {
                        return Err(InputError::new(
                            line,
                            InputErrorKind::CsvQuote(
                                "a quote inside an unquoted field: quote the whole field and \
                                 double the quote"
                                    .into(),
                            ),
                        ));
                    }
                    field.push(c);
                }
                field.truncate(field.trim_end().len());
            }
            fields.push(field);
            match chars.next() {
                Some(',') => continue,
                Some('\r') => {
                    chars.next_if_eq(&'\n');
                    line += 1;
                    break false;
                }
                Some('\n') => {
                    line += 1;
                    break false;
                }
                None => break true,
                // Invariant: the field loops above stop only at `,`, `\r`, `\n` or the end.
                Some(_) => unreachable!("a field ends at a separator"),
            }
        };
        let blank = fields.len() == 1 && fields[0].is_empty();
        if !blank {
            rows.push(Row {
                line: row_line,
                fields,
            });
        }
        if ended {
            return Ok(rows);
        }
    }
}

/// CSV with a header line: columns by name (`id,lat,lon` required; `heading_deg,speed_mps,
/// time,label` optional, in any order). An empty cell is an absent field.
pub fn read_csv(text: &str) -> Result<Vec<Record>, InputError> {
    let rows = csv_rows(text)?;
    let Some((header, rows)) = rows.split_first() else {
        return Err(InputError::new(
            1,
            InputErrorKind::CsvHeader(
                "no header line: the first line names the columns, like id,lat,lon".into(),
            ),
        ));
    };
    let header_error = |m: String| Err(InputError::new(header.line, InputErrorKind::CsvHeader(m)));
    let mut columns: Vec<Option<Column>> = Vec::with_capacity(header.fields.len());
    for name in &header.fields {
        let wanted = name.trim().to_ascii_lowercase();
        let column = Column::ALL.iter().copied().find(|c| c.name() == wanted);
        if column.is_some() && columns.contains(&column) {
            return header_error(format!("column {name:?} appears twice"));
        }
        columns.push(column);
    }
    let missing: Vec<&str> = Column::ALL
        .iter()
        .filter(|c| c.required() && !columns.contains(&Some(**c)))
        .map(|c| c.name())
        .collect();
    if !missing.is_empty() {
        return header_error(format!(
            "the header lacks {}: id, lat and lon are required (is the first line a header?)",
            missing.join(", ")
        ));
    }
    if let Some(i) = columns.iter().position(Option::is_none) {
        let known: Vec<&str> = Column::ALL.iter().map(|c| c.name()).collect();
        return header_error(format!(
            "unknown column {:?}: the columns are {}",
            header.fields[i],
            known.join(", ")
        ));
    }
    let columns: Vec<Column> = columns.into_iter().flatten().collect();
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        if row.fields.len() != columns.len() {
            return Err(InputError::new(
                row.line,
                InputErrorKind::FieldCount {
                    found: row.fields.len(),
                    expected: columns.len(),
                },
            ));
        }
        let mut fix = Map::new();
        for (i, (column, cell)) in columns.iter().zip(&row.fields).enumerate() {
            let name = column.name();
            if cell.is_empty() {
                if column.required() {
                    return Err(InputError::new(
                        row.line,
                        InputErrorKind::MissingValue {
                            column: i + 1,
                            name,
                        },
                    ));
                }
                continue;
            }
            let value = if column.numeric() {
                Value::Number(number(cell).ok_or_else(|| {
                    InputError::new(
                        row.line,
                        InputErrorKind::BadNumber {
                            column: i + 1,
                            name,
                            text: cell.clone(),
                        },
                    )
                })?)
            } else {
                Value::String(cell.clone())
            };
            fix.insert(name.to_string(), value);
        }
        out.push(Record {
            line: Some(row.line),
            fix,
        });
    }
    Ok(out)
}

/// A finite decimal number as JSON, or `None`.
fn number(text: &str) -> Option<Number> {
    let text = text.trim();
    // `f64::from_str` also takes "inf", "NaN" and "infinity": none of them is a position.
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'))
    {
        return None;
    }
    text.parse::<f64>().ok().and_then(Number::from_f64)
}

/// Byte offsets of line starts, to turn an offset into a line number.
struct Lines(Vec<usize>);

impl Lines {
    fn new(text: &str) -> Self {
        let mut starts = vec![0];
        starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Self(starts)
    }

    /// 1-based line of byte offset `pos`.
    fn of(&self, pos: usize) -> usize {
        self.0.partition_point(|&start| start <= pos)
    }
}

/// One XML piece, with the byte offset where it starts.
#[derive(Debug, PartialEq)]
enum Xml<'a> {
    /// `<name attrs>` or `<name attrs/>`.
    Open {
        name: &'a str,
        attrs: &'a str,
        empty: bool,
    },
    /// `</name>`.
    Close(&'a str),
    /// Character data (entities still encoded) or a CDATA section (raw).
    Text(&'a str, bool),
}

/// Splits XML into tags and text; skips the declaration, comments, processing instructions and
/// doctype. Enough for GPX, not a validating parser.
fn xml_pieces(text: &str) -> Result<Vec<(usize, Xml<'_>)>, (usize, String)> {
    let mut out = Vec::new();
    let mut pos = 0;
    let unclosed = |at: usize, what: &str| (at, format!("{what} is never closed"));
    while pos < text.len() {
        let rest = &text[pos..];
        let Some(lt) = rest.find('<') else {
            out.push((pos, Xml::Text(rest, false)));
            break;
        };
        if lt > 0 {
            out.push((pos, Xml::Text(&rest[..lt], false)));
        }
        let at = pos + lt;
        let tag = &text[at..];
        let skip_to = |end: &str, what: &str| {
            tag.find(end)
                .map(|i| at + i + end.len())
                .ok_or_else(|| unclosed(at, what))
        };
        if tag.starts_with("<!--") {
            pos = skip_to("-->", "a comment")?;
        } else if let Some(body) = tag.strip_prefix("<![CDATA[") {
            let end = body.find("]]>").ok_or_else(|| unclosed(at, "CDATA"))?;
            out.push((at, Xml::Text(&body[..end], true)));
            pos = at + "<![CDATA[".len() + end + 3;
        } else if tag.starts_with("<?") {
            pos = skip_to("?>", "a processing instruction")?;
        } else if tag.starts_with("<!") {
            pos = skip_to(">", "a declaration")?;
        } else {
            // The tag ends at the first `>` outside a quoted attribute value.
            let mut quote = None;
            let end = tag
                .char_indices()
                .find(|&(_, c)| match quote {
                    Some(q) if c == q => {
                        quote = None;
                        false
                    }
                    Some(_) => false,
                    None if c == '"' || c == '\'' => {
                        quote = Some(c);
                        false
                    }
                    None => c == '>',
                })
                .map(|(i, _)| i)
                .ok_or_else(|| unclosed(at, "a tag"))?;
            let inner = &tag[1..end];
            if let Some(name) = inner.strip_prefix('/') {
                out.push((at, Xml::Close(local_name(name.trim()))));
            } else {
                let (inner, empty) = match inner.strip_suffix('/') {
                    Some(i) => (i, true),
                    None => (inner, false),
                };
                let split = inner
                    .find(|c: char| c.is_whitespace())
                    .unwrap_or(inner.len());
                let name = &inner[..split];
                if name.is_empty() {
                    return Err((at, "a tag without a name".into()));
                }
                out.push((
                    at,
                    Xml::Open {
                        name: local_name(name),
                        attrs: &inner[split..],
                        empty,
                    },
                ));
            }
            pos = at + end + 1;
        }
    }
    Ok(out)
}

/// `gpx:trkpt` -> `trkpt`.
fn local_name(name: &str) -> &str {
    name.rsplit(':').next().unwrap_or(name)
}

/// The decoded value of attribute `want` in `attrs`.
fn attribute(attrs: &str, want: &str) -> Option<String> {
    let mut rest = attrs;
    loop {
        rest = rest.trim_start();
        let eq = rest.find('=')?;
        let name = rest[..eq].trim();
        let value = rest[eq + 1..].trim_start();
        let quote = value.chars().next().filter(|&c| c == '"' || c == '\'')?;
        let end = value[1..].find(quote)?;
        if local_name(name) == want {
            return Some(unescape(&value[1..1 + end]));
        }
        rest = &value[end + 2..];
    }
}

/// Decodes the five predefined XML entities and character references; leaves others as they
/// are.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp..];
        let decoded = after.find(';').and_then(|semi| {
            let entity = &after[1..semi];
            let c = match entity {
                "lt" => Some('<'),
                "gt" => Some('>'),
                "amp" => Some('&'),
                "quot" => Some('"'),
                "apos" => Some('\''),
                _ => {
                    let code = if let Some(hex) = entity
                        .strip_prefix("#x")
                        .or_else(|| entity.strip_prefix("#X"))
                    {
                        u32::from_str_radix(hex, 16).ok()
                    } else {
                        entity.strip_prefix('#').and_then(|d| d.parse().ok())
                    };
                    code.and_then(char::from_u32)
                }
            };
            c.map(|c| (c, semi + 1))
        });
        match decoded {
            Some((c, len)) => {
                out.push(c);
                rest = &after[len..];
            }
            None => {
                out.push('&');
                rest = &after[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// A track being read.
struct Track {
    line: usize,
    name: Option<String>,
    points: Vec<Record>,
}

/// GPX: each `<trk>` is a car whose id is the track's `<name>`; each `<trkpt lat lon>` is a fix,
/// with its `<time>` and, when present, GPX 1.0's `<course>` (heading) and `<speed>` (m/s).
pub fn read_gpx(text: &str) -> Result<Vec<Record>, InputError> {
    let lines = Lines::new(text);
    let gpx_error = |pos: usize, m: String| InputError::new(lines.of(pos), InputErrorKind::Gpx(m));
    let pieces = xml_pieces(text).map_err(|(pos, m)| gpx_error(pos, m))?;
    let mut stack: Vec<&str> = Vec::new();
    let mut track: Option<Track> = None;
    let mut point: Option<Record> = None;
    let mut out = Vec::new();
    for (pos, piece) in pieces {
        match piece {
            Xml::Open { name, attrs, empty } => {
                let parent = stack.last().copied();
                match name {
                    "trk" => {
                        if track.is_some() {
                            return Err(gpx_error(pos, "a <trk> inside a <trk>".into()));
                        }
                        track = Some(Track {
                            line: lines.of(pos),
                            name: None,
                            points: Vec::new(),
                        });
                    }
                    "trkpt" if parent == Some("trkseg") && track.is_some() => {
                        let mut fix = Map::new();
                        for key in ["lat", "lon"] {
                            let Some(text) = attribute(attrs, key) else {
                                return Err(gpx_error(
                                    pos,
                                    format!("<trkpt> without a {key} attribute"),
                                ));
                            };
                            let n = number(&text).ok_or_else(|| {
                                InputError::new(
                                    lines.of(pos),
                                    InputErrorKind::GpxNumber { name: key, text },
                                )
                            })?;
                            fix.insert(key.into(), Value::Number(n));
                        }
                        point = Some(Record {
                            line: Some(lines.of(pos)),
                            fix,
                        });
                    }
                    _ => {}
                }
                if empty {
                    close(name, &mut track, &mut point, &mut out)?;
                } else {
                    stack.push(name);
                }
            }
            Xml::Close(name) => {
                match stack.pop() {
                    Some(open) if open == name => {}
                    Some(open) => {
                        return Err(gpx_error(pos, format!("</{name}> closes <{open}>")));
                    }
                    None => return Err(gpx_error(pos, format!("</{name}> without <{name}>"))),
                }
                close(name, &mut track, &mut point, &mut out)?;
            }
            Xml::Text(raw, cdata) => {
                let Some(&element) = stack.last() else {
                    continue;
                };
                let parent = stack.len().checked_sub(2).map(|i| stack[i]);
                let text = if cdata {
                    raw.to_string()
                } else {
                    unescape(raw)
                };
                match (parent, element) {
                    (Some("trk"), "name") => {
                        if let Some(t) = &mut track {
                            t.name.get_or_insert_with(String::new).push_str(&text);
                        }
                    }
                    (Some("trkpt"), "time") => {
                        if let Some(p) = &mut point {
                            append_text(&mut p.fix, "time", &text);
                        }
                    }
                    (Some("trkpt"), "course" | "speed") => {
                        if let Some(p) = &mut point {
                            let key = if element == "course" {
                                "heading_deg"
                            } else {
                                "speed_mps"
                            };
                            append_text(&mut p.fix, key, &text);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(open) = stack.last() {
        return Err(InputError::new(
            lines.of(text.len()),
            InputErrorKind::Gpx(format!("<{open}> is never closed")),
        ));
    }
    if out.is_empty() {
        return Err(InputError::new(
            1,
            InputErrorKind::Gpx("no track points (<trk><trkseg><trkpt>) in the file".into()),
        ));
    }
    Ok(out)
}

/// Text of an element, which may arrive in pieces (text, then CDATA).
fn append_text(fix: &mut Map<String, Value>, key: &str, text: &str) {
    match fix.get_mut(key) {
        Some(Value::String(s)) => s.push_str(text),
        _ => {
            fix.insert(key.into(), Value::String(text.to_string()));
        }
    }
}

/// Finishes a `<trkpt>` or `<trk>` element.
fn close(
    name: &str,
    track: &mut Option<Track>,
    point: &mut Option<Record>,
    out: &mut Vec<Record>,
) -> Result<(), InputError> {
    match name {
        "trkpt" => {
            if let (Some(mut p), Some(t)) = (point.take(), track.as_mut()) {
                finish_point(&mut p)?;
                t.points.push(p);
            }
        }
        "trk" => {
            if let Some(t) = track.take() {
                let id = t.name.as_deref().map(str::trim).unwrap_or("");
                if id.is_empty() {
                    return Err(InputError::new(
                        t.line,
                        InputErrorKind::Gpx(
                            "a <trk> without a <name>: the track's name is the car's id".into(),
                        ),
                    ));
                }
                for mut p in t.points {
                    p.fix.insert("id".into(), Value::String(id.to_string()));
                    out.push(p);
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Trims a point's texts and turns course and speed into numbers.
fn finish_point(p: &mut Record) -> Result<(), InputError> {
    for (key, name) in [("heading_deg", "course"), ("speed_mps", "speed")] {
        if let Some(Value::String(text)) = p.fix.get(key) {
            let text = text.trim().to_string();
            let n = number(&text).ok_or_else(|| {
                InputError::new(
                    p.line.unwrap_or(0),
                    InputErrorKind::GpxNumber {
                        name,
                        text: text.clone(),
                    },
                )
            })?;
            p.fix.insert(key.into(), Value::Number(n));
        }
    }
    if let Some(Value::String(t)) = p.fix.get_mut("time") {
        *t = t.trim().to_string();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixes(records: &[Record]) -> Vec<Value> {
        records
            .iter()
            .map(|r| Value::Object(r.fix.clone()))
            .collect()
    }

    fn lines(records: &[Record]) -> Vec<usize> {
        records.iter().map(|r| r.line.unwrap()).collect()
    }

    #[test]
    fn format_from_path_by_extension() {
        assert_eq!(Format::from_path(Some(Path::new("a/b.CSV"))), Format::Csv);
        assert_eq!(Format::from_path(Some(Path::new("t.gpx"))), Format::Gpx);
        assert_eq!(
            Format::from_path(Some(Path::new("t.ndjson"))),
            Format::Ndjson
        );
        assert_eq!(Format::from_path(Some(Path::new("t"))), Format::Ndjson);
        assert_eq!(Format::from_path(None), Format::Ndjson);
    }

    #[test]
    fn ndjson_passes_objects_through_with_their_lines() {
        let text =
            "\u{feff}{\"id\":\"a\",\"lat\":1.5,\"lon\":2,\"extra\":true}\r\n\n  \n{\"id\":\"b\"}";
        let r = read(text.as_bytes(), Format::Ndjson).unwrap();
        assert_eq!(lines(&r), vec![1, 4]);
        assert_eq!(
            fixes(&r),
            vec![
                json!({"id": "a", "lat": 1.5, "lon": 2, "extra": true}),
                json!({"id": "b"}),
            ],
            "fields are the server's to check"
        );
        assert!(read(b"", Format::Ndjson).unwrap().is_empty());
    }

    #[test]
    fn ndjson_syntax_errors_and_non_objects_name_line_and_column() {
        let e = read(b"{\"id\":\"a\"}\n{\"id\": \"b\" oops}\n", Format::Ndjson).unwrap_err();
        assert_eq!(e.line, 2);
        assert!(
            matches!(&e.kind, InputErrorKind::Json { column: 12, message } if !message.contains("at line")),
            "{e:?}"
        );
        assert!(e.to_string().starts_with("line 2: column 12: "), "{e}");
        let e = read(b"{\"id\":\"a\"}\n\n[1, 2]\n", Format::Ndjson).unwrap_err();
        assert_eq!(
            (e.line, e.kind),
            (3, InputErrorKind::NotAnObject("an array"))
        );
        let e = read(b"{\"id\":\"a\"}\n\"x\xff\"\n", Format::Ndjson).unwrap_err();
        assert_eq!((e.line, e.kind), (2, InputErrorKind::NotUtf8));
    }

    #[test]
    fn csv_reads_columns_by_name_with_quotes_and_empty_cells() {
        let text = "lon, ID ,lat,label,time,heading_deg,speed_mps\r\n\
                    4.87,truck-17,52.36,\"Truck 17, \"\"north\"\"\",2026-11-29T14:00:00Z,90,12.5\r\n\
                    \n\
                    4.88,\"van\n2\",52.37,,,,\n\
                    -4.5e-1,c,52.38,  \"spaced\"  ,,, 0 ";
        let r = read(text.as_bytes(), Format::Csv).unwrap();
        assert_eq!(
            lines(&r),
            vec![2, 4, 6],
            "a record's line is where it starts"
        );
        assert_eq!(
            fixes(&r),
            vec![
                json!({"id": "truck-17", "lat": 52.36, "lon": 4.87, "label": "Truck 17, \"north\"",
                       "time": "2026-11-29T14:00:00Z", "heading_deg": 90.0, "speed_mps": 12.5}),
                json!({"id": "van\n2", "lat": 52.37, "lon": 4.88}),
                json!({"id": "c", "lat": 52.38, "lon": -0.45, "label": "spaced", "speed_mps": 0.0}),
            ]
        );
        assert!(read(b"id,lat,lon\n", Format::Csv).unwrap().is_empty());
    }

    #[test]
    fn csv_bad_numbers_and_missing_cells_name_line_and_column() {
        let e = read(b"id,lat,lon\na,52.3,4.8\nb,52.3,4,8\n", Format::Csv).unwrap_err();
        assert_eq!(
            (e.line, e.kind),
            (
                3,
                InputErrorKind::FieldCount {
                    found: 4,
                    expected: 3
                }
            )
        );
        let e = read(
            b"id,lat,lon\na,52.3,4.8\nb,52,3,4.8\n".as_slice(),
            Format::Csv,
        );
        assert!(e.is_err());
        let e = read(b"id,lon,lat\n\na,4.8,\"52,3\"\n", Format::Csv).unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(
            e.to_string(),
            "line 3: column 3 (lat): \"52,3\" is not a number"
        );
        for bad in ["NaN", "inf", "1e999", "x"] {
            let text = format!("id,lat,lon,speed_mps\na,52.3,4.8,{bad}\n");
            let e = read(text.as_bytes(), Format::Csv).unwrap_err();
            assert!(
                matches!(
                    e.kind,
                    InputErrorKind::BadNumber {
                        column: 4,
                        name: "speed_mps",
                        ..
                    }
                ),
                "{bad}: {e}"
            );
        }
        let e = read(b"id,lat,lon\n,52.3,4.8\n", Format::Csv).unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: column 1 (id) is empty: id, lat and lon are required"
        );
    }

    #[test]
    fn csv_header_and_quote_errors() {
        let header = |t: &str| read(t.as_bytes(), Format::Csv).unwrap_err().to_string();
        assert!(header("").contains("no header line"));
        assert!(header("\n\n").starts_with("line 1: no header line"));
        assert!(header("id,lat\n").contains("lacks lon"));
        assert!(header("id,lat,lon,heading\n").contains("unknown column \"heading\""));
        assert!(header("id,lat,lon,lat\n").contains("appears twice"));
        assert!(header("a,52.3,4.8\n").contains("is the first line a header?"));
        let e = read(b"id,lat,lon,label\na,1,2,\"open\nstill open", Format::Csv).unwrap_err();
        assert_eq!(e.line, 2, "reported where the quote opened: {e}");
        assert!(e.to_string().contains("never closed"));
        let e = read(b"id,lat,lon,label\na,1,2,\"x\"y\n", Format::Csv).unwrap_err();
        assert!(e.to_string().contains("after a closing quote"), "{e}");
        let e = read(b"id,lat,lon,label\na,1,2,x\"y\"\n", Format::Csv).unwrap_err();
        assert!(e.to_string().contains("inside an unquoted field"), "{e}");
    }

    const GPX: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!-- recorded by hand -->
<gpx version="1.1" creator="test" xmlns="http://www.topografix.com/GPX/1/1">
  <metadata><name>not a car</name></metadata>
  <trk>
    <name>Truck &amp; <![CDATA[Trailer]]></name>
    <trkseg>
      <trkpt lat="52.36" lon='4.87'><ele>1</ele><time>2026-11-29T14:00:00Z</time></trkpt>
      <trkpt lat="52.361" lon="4.871">
        <time> 2026-11-29T14:00:01Z </time><course>90.5</course><speed>3</speed>
      </trkpt>
    </trkseg>
  </trk>
  <trk><name>v2</name><trkseg><trkpt lat="52.37" lon="4.88"/></trkseg></trk>
</gpx>
"#;

    #[test]
    fn gpx_tracks_become_fixes_named_by_the_track() {
        let r = read(GPX.as_bytes(), Format::Gpx).unwrap();
        assert_eq!(lines(&r), vec![8, 9, 14]);
        assert_eq!(
            fixes(&r),
            vec![
                json!({"id": "Truck & Trailer", "lat": 52.36, "lon": 4.87,
                       "time": "2026-11-29T14:00:00Z"}),
                json!({"id": "Truck & Trailer", "lat": 52.361, "lon": 4.871,
                       "time": "2026-11-29T14:00:01Z", "heading_deg": 90.5, "speed_mps": 3.0}),
                json!({"id": "v2", "lat": 52.37, "lon": 4.88}),
            ]
        );
    }

    #[test]
    fn gpx_errors_name_the_line() {
        let err = |t: &str| read(t.as_bytes(), Format::Gpx).unwrap_err();
        let e =
            err("<gpx>\n<trk>\n<trkseg><trkpt lat=\"52.3\" lon=\"4.8\"/></trkseg>\n</trk></gpx>");
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("without a <name>"), "{e}");
        let e = err(
            "<gpx><trk><name>a</name><trkseg>\n<trkpt lat=\"x\" lon=\"4.8\"/></trkseg></trk></gpx>",
        );
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("\"x\" is not a number"), "{e}");
        let e =
            err("<gpx><trk><name>a</name><trkseg>\n\n<trkpt lon=\"4.8\"/></trkseg></trk></gpx>");
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("without a lat attribute"), "{e}");
        let e = err("<gpx>\n<trk><name>a</name>\n</gpx>");
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("</gpx> closes <trk>"), "{e}");
        let e = err("<gpx>\n<trk><name>a</name>");
        assert!(e.to_string().contains("never closed"), "{e}");
        let e = err("<gpx><wpt lat=\"1\" lon=\"2\"/></gpx>");
        assert!(e.to_string().contains("no track points"), "{e}");
        let e = err("<gpx><trk><name>a</name><trkseg><trkpt lat=\"1\" lon=\"2\"><speed>fast</speed></trkpt></trkseg></trk></gpx>");
        assert!(
            e.to_string().contains("speed: \"fast\" is not a number"),
            "{e}"
        );
    }

    #[test]
    fn xml_unescape_entities_and_references() {
        assert_eq!(
            unescape("a &lt;&gt;&amp;&quot;&apos; &#65;&#x42; &nope; &"),
            "a <>&\"' AB &nope; &"
        );
    }

    /// A CSV field as a writer would put it: quoted when it must be.
    fn csv_field(text: &str) -> String {
        if text.contains([',', '"', '\n', '\r']) || text.trim() != text {
            format!("\"{}\"", text.replace('"', "\"\""))
        } else {
            text.to_string()
        }
    }

    fn xml_escape(text: &str) -> String {
        text.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    }

    type Row = (String, f64, f64, Option<String>);

    fn rows() -> impl proptest::strategy::Strategy<Value = Vec<Row>> {
        use proptest::prelude::*;
        prop::collection::vec(
            (
                "[^\\x00]{1,12}",
                -90.0..90.0f64,
                -180.0..180.0f64,
                proptest::option::of("[^\\x00]{0,12}"),
            ),
            0..20,
        )
    }

    proptest::proptest! {
        #[test]
        fn csv_round_trips_quoted_text_and_numbers(rows in rows()) {
            let mut text = String::from("id,lat,lon,label\r\n");
            let mut expected_lines = Vec::new();
            let mut line = 2;
            for (id, lat, lon, label) in &rows {
                let row = format!(
                    "{},{lat},{lon},{}\r\n",
                    csv_field(id),
                    label.as_deref().map(csv_field).unwrap_or_default()
                );
                expected_lines.push(line);
                line += row.matches('\n').count();
                text.push_str(&row);
            }
            let records = read(text.as_bytes(), Format::Csv).unwrap();
            proptest::prop_assert_eq!(lines(&records), expected_lines);
            for (r, (id, lat, lon, label)) in records.iter().zip(&rows) {
                proptest::prop_assert_eq!(&r.fix["id"], id.as_str());
                proptest::prop_assert_eq!(r.fix["lat"].as_f64(), Some(*lat));
                proptest::prop_assert_eq!(r.fix["lon"].as_f64(), Some(*lon));
                let label = label.as_deref().filter(|l| !l.is_empty());
                proptest::prop_assert_eq!(r.fix.get("label").and_then(Value::as_str), label);
            }
        }

        #[test]
        fn gpx_round_trips_track_names_and_points(rows in rows()) {
            let mut text = String::from("<gpx>\n");
            for (id, lat, lon, _) in &rows {
                text.push_str(&format!(
                    "<trk><name>{}</name><trkseg>\n<trkpt lat=\"{lat}\" lon=\"{lon}\"/>\n</trkseg></trk>\n",
                    xml_escape(id)
                ));
            }
            text.push_str("</gpx>\n");
            let result = read(text.as_bytes(), Format::Gpx);
            let named: Vec<&Row> = rows.iter().filter(|r| !r.0.trim().is_empty()).collect();
            if named.len() < rows.len() || rows.is_empty() {
                proptest::prop_assert!(result.is_err(), "a blank name or no point is an error");
                return Ok(());
            }
            let records = result.unwrap();
            proptest::prop_assert_eq!(records.len(), rows.len());
            for (r, (id, lat, lon, _)) in records.iter().zip(&rows) {
                proptest::prop_assert_eq!(&r.fix["id"], id.trim());
                proptest::prop_assert_eq!(r.fix["lat"].as_f64(), Some(*lat));
                proptest::prop_assert_eq!(r.fix["lon"].as_f64(), Some(*lon));
            }
        }

        #[test]
        fn readers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)) {
            for format in [Format::Ndjson, Format::Csv, Format::Gpx] {
                let _ = read(&bytes, format);
            }
        }

        #[test]
        fn readers_never_panic_on_markup_like_text(text in "[<>/=\"' a-z!?\\[\\]&;#x0-9,\n\r-]{0,200}") {
            for format in [Format::Ndjson, Format::Csv, Format::Gpx] {
                let _ = read(text.as_bytes(), format);
            }
        }
    }
}
