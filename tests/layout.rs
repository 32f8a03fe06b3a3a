//! The source tree's shape, checked: every module under `src/` imports only modules of lower
//! layers (or the few same-layer ones listed here), the imports between top-level modules form
//! no circle, the node never imports the control plane, and no source file other than tests is
//! over 900 lines. The layers are those of lib.rs's comment and DESIGN.md's layout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules by layer: a module may import modules of lower layers.
const LAYERS: &[(&str, u32)] = &[
    ("cmd", 6),
    ("api", 5),
    ("csi", 4),
    ("k8s", 4),
    ("control", 3),
    ("node", 3),
    ("scheduler", 2),
    ("store", 2),
    ("engine", 2),
    ("replica", 2),
    ("rpc", 2),
    ("model", 1),
    ("params", 1),
    ("settings", 1),
    ("locks", 1),
];

/// Imports within one layer that are allowed (the graph must still have no circle).
const SAME_LAYER: &[(&str, &str)] = &[
    ("engine", "replica"),
    ("rpc", "replica"),
    ("model", "params"),
    ("settings", "params"),
];

const MAX_LINES: usize = 900;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {dir:?}: {e}"));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/node/mount.rs` → `node`), or None for the
/// crate roots.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("file under src");
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

fn is_test_file(file: &Path) -> bool {
    file.file_name().is_some_and(|n| n == "tests.rs")
}

/// The file's code without comments and without its inline test module.
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed == "#[cfg(test)]" {
            if let Some(next) = lines.peek() {
                if next.trim_start().starts_with("mod tests") {
                    break;
                }
            }
        }
        if trimmed.starts_with("//") {
            continue;
        }
        let code = match line.find("//") {
            // A `//` inside a string (a URL) is rare in this tree; cutting there only loses
            // the rest of that line, never invents an import.
            Some(i) => &line[..i],
            None => line,
        };
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// The top-level modules that `code` names as `crate::X`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
        rest = after;
    }
    found
}

#[test]
fn imports_run_down_the_layers_without_circles_and_files_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layers: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();

    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("read {file:?}: {e}"));
        let rel = file
            .strip_prefix(&src)
            .expect("under src")
            .display()
            .to_string();
        if !is_test_file(file) && text.lines().count() > MAX_LINES {
            problems.push(format!(
                "{rel}: {} lines (at most {MAX_LINES} outside tests)",
                text.lines().count()
            ));
        }
        let Some(from) = top_module(&src, file) else {
            continue;
        };
        let Some(&from_layer) = layers.get(from.as_str()) else {
            problems.push(format!(
                "{rel}: module {from:?} has no layer in tests/layout.rs"
            ));
            continue;
        };
        if is_test_file(file) {
            continue;
        }
        for to in imports(&production_code(&text)) {
            if to == from {
                continue;
            }
            let Some(&to_layer) = layers.get(to.as_str()) else {
                problems.push(format!("{rel}: imports crate::{to}, which has no layer"));
                continue;
            };
            let sideways = SAME_LAYER.contains(&(from.as_str(), to.as_str()));
            if to_layer > from_layer || (to_layer == from_layer && !sideways) {
                problems.push(format!(
                    "{rel}: {from} (layer {from_layer}) imports {to} (layer {to_layer})"
                ));
            }
            graph.entry(from.clone()).or_default().insert(to);
        }
    }

    // No circle, whatever the layers allow: a depth-first search for a back edge.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
        problems: &mut Vec<String>,
    ) {
        if done.contains(node) {
            return;
        }
        if let Some(i) = path.iter().position(|n| n == node) {
            problems.push(format!(
                "import circle: {} -> {node}",
                path[i..].join(" -> ")
            ));
            return;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            visit(next, graph, path, done, problems);
        }
        path.pop();
        done.insert(node.to_string());
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        visit(node, &graph, &mut Vec::new(), &mut done, &mut problems);
    }
    assert!(
        graph.get("node").is_none_or(|to| !to.contains("control")),
        "the node imports the control plane"
    );
    assert!(
        problems.is_empty(),
        "the layout rules are broken:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_checker_sees_imports_and_skips_comments_and_tests() {
    let code = production_code(
        "use crate::model::Volume;\n// crate::control in a comment\nlet x = crate::params::parse(); // crate::cmd\n#[cfg(test)]\nmod tests {\n    use crate::cmd;\n}\n",
    );
    assert_eq!(
        imports(&code),
        BTreeSet::from(["model".to_string(), "params".to_string()])
    );
}
