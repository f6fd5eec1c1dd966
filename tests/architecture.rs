//! The intended structure of `src/`, written down once and held against the
//! code: layers that flow one way, files of at most 600 lines, functions of
//! at most 80.
//!
//! [`LAYERS`] lists the top-level modules from the bottom up. A module may
//! import from layers below its own and from itself, never from a layer
//! above nor from another module of its own layer (the planes are siblings:
//! they share what is below them, not each other). Imports are read from the
//! code (comments, strings and `#[cfg(test)]` items left out): `use crate::…`
//! lines, `crate::…` paths anywhere, and `super::…` paths that climb out of a
//! module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The layers, bottom first. `lib.rs` only declares them; `main.rs` is the
/// binary on top of everything.
const LAYERS: &[&[&str]] = &[
    // Plain data and the drills' crash points: no dependencies inside kpay.
    &["model", "failpoint"],
    // Settings with their types and limits.
    &["config"],
    // The durable log (embedded or Kafka).
    &["log"],
    // Membership of a Kafka consumer group: which instance owns which partitions.
    &["cluster"],
    // State tables and checkpoints (its errors know full devices from the log).
    &["store"],
    // The processors, as pure logic.
    &["pipeline"],
    // Tasks, ingest, flush and retention: all IO of the pipeline.
    &["runtime"],
    // The other three planes, and the generator, over the runtime.
    &["instrument", "control", "ops", "generator"],
    // The HTTP API and the web UI.
    &["http"],
    // The composition root.
    &["app"],
    // The benchmark runs the whole application.
    &["bench"],
];

const MAX_FILE_LINES: usize = 600;
const MAX_FUNCTION_LINES: usize = 80;

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

/// One import that breaks the layering.
#[derive(Debug, PartialEq)]
struct Violation {
    file: String,
    line: usize,
    path: String,
    why: String,
}

// The source tree's layering holds: no module imports a layer above it or a sibling of its layer.
#[test]
fn layers_flow_one_way() {
    let mut violations = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for file in source_files() {
        let Some(module_path) = module_path(&file) else {
            continue;
        };
        *seen.entry(module_path[0].clone()).or_default() += 1;
        let code = code_only(&std::fs::read_to_string(&file).unwrap());
        violations.extend(check(&display(&file), &module_path, &code));
    }
    for module in seen.keys() {
        assert!(
            layer_of(module).is_some(),
            "src/{module} is in no layer: add it to LAYERS in tests/architecture.rs"
        );
    }
    assert!(
        seen.len() >= 10,
        "found only {seen:?}: is src/ where it should be?"
    );
    let report: Vec<String> = violations
        .iter()
        .map(|v| format!("{}:{}: imports {} ({})", v.file, v.line, v.path, v.why))
        .collect();
    assert!(
        report.is_empty(),
        "imports against the layering:\n{}",
        report.join("\n")
    );
}

// No file in src/ is longer than 600 lines, and no function longer than 80.
#[test]
fn files_and_functions_stay_short() {
    let mut long = Vec::new();
    for file in source_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        let lines = text.lines().count();
        if lines > MAX_FILE_LINES {
            long.push(format!("{}: {lines} lines", display(&file)));
        }
        for (name, start, length) in functions(&code_only(&text)) {
            if length > MAX_FUNCTION_LINES {
                long.push(format!(
                    "{}:{start}: fn {name} is {length} lines",
                    display(&file)
                ));
            }
        }
    }
    assert!(
        long.is_empty(),
        "over {MAX_FILE_LINES} lines a file or {MAX_FUNCTION_LINES} a function:\n{}",
        long.join("\n")
    );
}

// The checker finds what it must: an import upward, one between siblings, one through `super`, and none in tests or comments.
#[test]
fn the_checker_catches_upward_and_sibling_imports() {
    let found = only_violation("config", "use crate::http::auth::Tokens;\n");
    assert!(found.why.contains("above"), "{found:?}");

    let text = "use crate::{\n    log::Log,\n    ops::dlq::TABLE,\n};\n";
    let found = only_violation("instrument::lag", text);
    assert_eq!((found.line, found.path.as_str()), (3, "crate::ops"));
    assert!(found.why.contains("sibling"), "{found:?}");

    only_violation("generator", "use super::http::AppState;\n");

    let text = "use super::super::core::Core;\nfn f() { crate::ops::dlq::hex(b\"\"); }\n";
    assert_eq!(only_violation("runtime::task::apply", text).line, 2);

    let quiet = "// use crate::http;\nconst S: &str = \"crate::http\";\n\
                 #[cfg(test)]\nmod tests {\n    use crate::http::app;\n}\n";
    assert!(check("store/mod.rs", &["store".to_owned()], &code_only(quiet)).is_empty());
}

/// The one violation `text` has as the code of module `module`.
fn only_violation(module: &str, text: &str) -> Violation {
    let path: Vec<String> = module.split("::").map(str::to_owned).collect();
    let mut found = check(module, &path, &code_only(text));
    assert_eq!(found.len(), 1, "{module}: {found:?}");
    found.remove(0)
}

// The length check counts a function from `fn` to its closing brace, braces in strings aside.
#[test]
fn the_length_check_counts_whole_functions() {
    let text = "fn short() {\n    let s = \"}}{\";\n}\n\npub(crate) async fn longer(x: u8) -> u8 {\n    if x > 0 {\n        x\n    } else {\n        0\n    }\n}\n";
    let found = functions(&code_only(text));
    assert_eq!(
        found,
        vec![("short".to_owned(), 1, 3), ("longer".to_owned(), 5, 7)]
    );
}

fn source_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn display(file: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    file.strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string()
}

/// The module path of a file under `src/` (`src/runtime/task/mod.rs` →
/// `runtime::task`); `None` for the crate roots `lib.rs` and `main.rs`.
fn module_path(file: &Path) -> Option<Vec<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let relative = file.strip_prefix(root).ok()?;
    let mut parts: Vec<String> = relative
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    match parts.as_slice() {
        [only] if only == "lib" || only == "main" => None,
        _ => Some(parts),
    }
}

/// The imports of one file that break the layering.
fn check(file: &str, module_path: &[String], code: &str) -> Vec<Violation> {
    let own = &module_path[0];
    let own_layer = layer_of(own).unwrap_or(usize::MAX);
    let mut violations = Vec::new();
    for (line, target) in imported_modules(module_path, code) {
        if &target == own {
            continue;
        }
        let why = match layer_of(&target) {
            Some(layer) if layer < own_layer => continue,
            Some(layer) if layer == own_layer => format!("{target} is a sibling of {own}"),
            Some(_) => format!("{target} is in a layer above {own}"),
            None => format!("{target} is in no layer"),
        };
        violations.push(Violation {
            file: file.to_owned(),
            line,
            path: format!("crate::{target}"),
            why,
        });
    }
    violations
}

/// (line, top-level module) of every path into another module.
fn imported_modules(module_path: &[String], code: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    let mut line = 1;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            line += 1;
        }
        let starts_word = i == 0 || !is_ident(bytes[i - 1]) && bytes[i - 1] != b':';
        if starts_word {
            if let Some((modules, _)) = path_at(code, i, module_path) {
                for (offset_lines, module) in modules {
                    found.push((line + offset_lines, module));
                }
            }
        }
        i += 1;
    }
    found
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The top-level modules named by a path starting at `at` (`crate::x`,
/// `crate::{x, y}`, `super::…`), with the line offsets where they are named.
fn path_at(code: &str, at: usize, module_path: &[String]) -> Option<(Vec<(usize, String)>, usize)> {
    let rest = &code[at..];
    let mut cursor = if let Some(after) = rest.strip_prefix("crate::") {
        code.len() - after.len()
    } else if rest.starts_with("super::") {
        let mut climbed = 0;
        let mut cursor = at;
        while code[cursor..].starts_with("super::") {
            climbed += 1;
            cursor += "super::".len();
        }
        // `super` from a file's module climbs to its parent.
        let base = module_path.len().checked_sub(climbed)?;
        if base > 0 {
            return None; // still inside a top-level module
        }
        cursor
    } else {
        return None;
    };
    let text = &code[cursor..];
    if text.starts_with('{') {
        // `crate::{a::b, c}`: the first segment of each item.
        let end = matching_brace(text)?;
        cursor += end;
        return Some((group_modules(&text[1..end]), cursor));
    }
    let name: String = text
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if name.is_empty() {
        return None;
    }
    Some((vec![(0, name)], cursor))
}

/// The first segment of each item of a `{…}` import group, with the line
/// offset where it is named.
fn group_modules(inner: &str) -> Vec<(usize, String)> {
    let mut modules = Vec::new();
    let (mut level, mut lines, mut item_start) = (0, 0, true);
    let mut word = String::new();
    let mut flush = |word: &mut String, lines: usize| {
        if !word.is_empty() && word != "self" {
            modules.push((lines, word.clone()));
        }
        word.clear();
    };
    for c in inner.chars() {
        let ident = c.is_alphanumeric() || c == '_';
        if ident && item_start && level == 0 {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            flush(&mut word, lines);
            item_start = false;
        }
        match c {
            '\n' => lines += 1,
            '{' => level += 1,
            '}' => level -= 1,
            ',' if level == 0 => item_start = true,
            c if !c.is_whitespace() => item_start = false,
            _ => {}
        }
    }
    flush(&mut word, lines);
    modules
}

fn matching_brace(text: &str) -> Option<usize> {
    let mut level = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => level += 1,
            '}' => {
                level -= 1;
                if level == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// The code with comments, string and char literals blanked (newlines
/// kept) and `#[cfg(test)]` items removed, so that only what compiles into
/// the program is read.
fn code_only(text: &str) -> String {
    let blanked = blank_comments_and_strings(text);
    remove_test_items(&blanked)
}

fn blank_comments_and_strings(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |c: char| if c == '\n' { '\n' } else { ' ' };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut level = 0;
            loop {
                if i >= chars.len() {
                    break;
                }
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    level += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    level -= 1;
                    out.push_str("  ");
                    i += 2;
                    if level == 0 {
                        break;
                    }
                } else {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r' && (next == Some('"') || next == Some('#')) && !prev_ident(&chars, i) {
            // A raw string: r"…" or r#"…"#.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let closing: String = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            let closing: Vec<char> = closing.chars().collect();
            let mut k = j + 1;
            while k < chars.len() && !chars[k..].starts_with(&closing) {
                k += 1;
            }
            let end = (k + closing.len()).min(chars.len());
            out.extend(chars[i..end].iter().map(|&c| blank(c)));
            i = end;
        } else if c == '"' {
            out.push(' ');
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(blank(chars[i]));
                    i += 1;
                }
            }
            out.push(' ');
            i += 1;
        } else if c == '\'' && is_char_literal(&chars, i) {
            let end = chars[i + 1..]
                .iter()
                .position(|&c| c == '\'')
                .map_or(chars.len(), |p| i + 1 + p + 1);
            // An escaped quote: '\''.
            let end = if chars.get(i + 1) == Some(&'\\') && chars.get(i + 2) == Some(&'\'') {
                i + 4
            } else {
                end
            };
            out.extend(chars[i..end.min(chars.len())].iter().map(|_| ' '));
            i = end;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

fn prev_ident(chars: &[char], i: usize) -> bool {
    i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_')
}

/// `'x'` or `'\n'`, not a lifetime (`'a`).
fn is_char_literal(chars: &[char], i: usize) -> bool {
    matches!(
        (chars.get(i + 1), chars.get(i + 2)),
        (Some('\\'), _) | (Some(_), Some('\''))
    )
}

/// Removes every item that follows a `#[cfg(test)]` attribute (up to its
/// closing brace or semicolon), keeping newlines so line numbers hold.
fn remove_test_items(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let mut level = 0;
        let mut end = item.len();
        for (i, c) in item.char_indices() {
            match c {
                '{' => level += 1,
                '}' => {
                    level -= 1;
                    if level == 0 {
                        end = i + 1;
                        break;
                    }
                }
                ';' if level == 0 => {
                    end = i + 1;
                    break;
                }
                _ => {}
            }
        }
        out.extend(
            item[..end]
                .chars()
                .map(|c| if c == '\n' { '\n' } else { ' ' }),
        );
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// Every function with a body: (name, first line, length in lines).
fn functions(code: &str) -> Vec<(String, usize, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut found = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let Some(name) = function_name(line) else {
            continue;
        };
        let (mut level, mut brackets) = (0, 0);
        let mut opened = false;
        'lines: for (offset, body_line) in lines[index..].iter().enumerate() {
            for c in body_line.chars() {
                match c {
                    '{' => {
                        level += 1;
                        opened = true;
                    }
                    '}' => level -= 1,
                    '(' | '[' => brackets += 1,
                    ')' | ']' => brackets -= 1,
                    // A declaration without a body (not the `;` of `[u8; 4]`).
                    ';' if !opened && brackets == 0 => break 'lines,
                    _ => {}
                }
                if opened && level == 0 {
                    found.push((name.clone(), index + 1, offset + 1));
                    break 'lines;
                }
            }
        }
    }
    found
}

fn function_name(line: &str) -> Option<String> {
    let mut words = line.split_whitespace().peekable();
    while let Some(word) = words.next() {
        match word {
            "fn" => {
                let name: String = words
                    .next()?
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                return (!name.is_empty()).then_some(name);
            }
            "pub" | "async" | "const" | "unsafe" | "extern" => {}
            w if w.starts_with("pub(") => {}
            _ => return None,
        }
    }
    None
}
