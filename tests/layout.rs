//! The shape of the code, as the design asks for it: no import circle among the host library's
//! modules (each `use crate::x` is an edge), and a thin `main.rs` that only parses and
//! dispatches.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The names lib.rs re-exports, by the module they come from (`pub use model::{Model, ..}`),
/// so that `crate::Model` counts as an edge to `model`.
fn reexports(src: &Path) -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let mut names = BTreeMap::new();
    for statement in lib.split(';') {
        let Some(rest) = statement.trim().strip_prefix("pub use ") else {
            continue;
        };
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        for item in items.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
            if item.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
                names.insert(item.to_string(), module.to_string());
            }
        }
    }
    names
}

/// The library's top-level modules and the modules each one `use`s.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = support::workspace_root().join("host/src");
    let reexported = reexports(&src);
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let module = match path.file_name().and_then(|n| n.to_str()) {
            Some("lib.rs") | Some("bin") => continue,
            Some(name) if name.ends_with(".rs") => name.trim_end_matches(".rs").to_string(),
            Some(name) if path.is_dir() => name.to_string(),
            _ => continue,
        };
        let mut deps = BTreeSet::new();
        for file in rust_files(&path) {
            let text = std::fs::read_to_string(&file).unwrap();
            for line in text.lines() {
                let line = line.trim_start();
                let Some(rest) = line
                    .strip_prefix("use crate::")
                    .or_else(|| line.strip_prefix("pub(crate) use crate::"))
                else {
                    continue;
                };
                add_edge(&mut deps, &module, rest, &reexported);
            }
            // Paths written inline in code (`crate::units::serde::micros`) count as edges
            // too; doc links do not.
            let code: String = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//"))
                .collect::<Vec<_>>()
                .join("\n");
            for (i, _) in code.match_indices("crate::") {
                add_edge(&mut deps, &module, &code[i + 7..], &reexported);
            }
        }
        graph.insert(module, deps);
    }
    graph
}

/// Adds the module that `path` (what follows `crate::`) names to `deps`, unless it is `module`
/// itself; a re-exported name stands for the module it comes from.
fn add_edge(
    deps: &mut BTreeSet<String>,
    module: &str,
    path: &str,
    reexported: &BTreeMap<String, String>,
) {
    let name: String = path
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    let target = reexported.get(&name).cloned().unwrap_or(name);
    if target != module && !target.is_empty() {
        deps.insert(target);
    }
}

fn rust_files(path: &Path) -> Vec<std::path::PathBuf> {
    if path.is_dir() {
        std::fs::read_dir(path)
            .unwrap()
            .flat_map(|e| rust_files(&e.unwrap().path()))
            .collect()
    } else {
        vec![path.to_path_buf()]
    }
}

/// A cycle in `graph`, if there is one (depth-first search).
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for dep in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(dep, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut Vec::new(), &mut done) {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn host_modules_import_each_other_without_a_circle() {
    let graph = module_graph();
    assert!(
        graph.contains_key("run") && graph.contains_key("accel"),
        "{graph:?}"
    );
    assert_eq!(find_cycle(&graph), None, "{graph:#?}");
}

#[test]
fn the_cycle_finder_finds_a_planted_cycle() {
    let mut graph = BTreeMap::new();
    graph.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    graph.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
}

#[test]
fn main_only_parses_and_dispatches() {
    let main = support::workspace_root().join("host/src/bin/wasm-infer/main.rs");
    let lines = std::fs::read_to_string(main).unwrap().lines().count();
    assert!(lines < 120, "main.rs has {lines} lines");
}
