//! The shape of the code, as the design asks for it: no import circle among the host library's
//! modules (each `use crate::x` is an edge), none among the files of a directory module (each
//! `super::x` or `crate::dir::x` naming a sibling file, directly or through the module root's
//! re-exports, is an edge; the root itself is the shared place its files may all use), and a
//! thin `main.rs` that only parses and dispatches.

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

/// Code without its comment lines (doc links are not edges).
fn code_of(file: &Path) -> String {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The leading identifier of `text`.
fn ident(text: &str) -> String {
    text.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The names a directory module's root (`mod.rs`) takes from its files with `use` (re-exported
/// or not), by the file they come from: `pub use host::{cost, Tensor}` maps both to `host`.
fn root_imports(root: &str, files: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for statement in root.split(';') {
        let flat = statement.split_whitespace().collect::<Vec<_>>().join(" ");
        let Some(at) = flat
            .match_indices("use ")
            .map(|(i, _)| i)
            .filter(|&i| i == 0 || flat.as_bytes()[i - 1] == b' ')
            .last()
        else {
            continue;
        };
        let rest = flat[at + 4..].replace(' ', "");
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        if !files.contains(module) {
            continue;
        }
        for item in items.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
            if !item.is_empty() && item != "self" {
                names.insert(item.to_string(), module.to_string());
            }
        }
    }
    names
}

/// For each directory module under `src` (nested ones too, keyed by their path:
/// `serve/ratelimit`), the graph of its files (the root excluded): an edge from a file to each
/// sibling it names through `super::` or `crate::<dir>::`, directly (`super::host::failure`) or
/// through a name the root takes from that sibling (`super::ModelWeights`,
/// `super::{Accel, ModelWeights}`). A nested directory module is one node of its parent's
/// graph, with the edges of all its files (`super::super::x` from its files, `super::x` from
/// its root).
fn file_graphs(src: &Path) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut graphs = BTreeMap::new();
    for entry in std::fs::read_dir(src).unwrap() {
        let dir = entry.unwrap().path();
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        if !dir.is_dir() || name == "bin" || !dir.join("mod.rs").is_file() {
            continue;
        }
        dir_graphs(&dir, &name, &mut graphs);
    }
    graphs
}

/// The graph of the directory module `dir` (`path` from the crate root, `/`-separated), and
/// those of the directory modules inside it.
fn dir_graphs(
    dir: &Path,
    path: &str,
    graphs: &mut BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
) {
    let mut files = BTreeSet::new();
    let mut subdirs = BTreeSet::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let file = entry.unwrap().path();
        let stem = file.file_stem().unwrap().to_string_lossy().to_string();
        if file.is_dir() && file.join("mod.rs").is_file() {
            dir_graphs(&file, &format!("{path}/{stem}"), graphs);
            subdirs.insert(stem.clone());
            files.insert(stem);
        } else if file.extension().is_some_and(|e| e == "rs") && stem != "mod" {
            files.insert(stem);
        }
    }
    let via_root = root_imports(&code_of(&dir.join("mod.rs")), &files);
    let prefix = format!("crate::{}::", path.replace('/', "::"));
    let mut graph = BTreeMap::new();
    for file in &files {
        // (code, the markers that name this directory's root in it)
        let sources: Vec<(String, Vec<String>)> = if subdirs.contains(file) {
            let sub = dir.join(file);
            std::fs::read_dir(&sub)
                .unwrap()
                .filter_map(|e| {
                    let f = e.unwrap().path();
                    (f.extension()? == "rs").then_some(f)
                })
                .map(|f| {
                    let up = if f.file_stem().unwrap() == "mod" {
                        "super::"
                    } else {
                        "super::super::"
                    };
                    (code_of(&f), vec![up.to_string(), prefix.clone()])
                })
                .collect()
        } else {
            let code = code_of(&dir.join(format!("{file}.rs")));
            vec![(code, vec!["super::".to_string(), prefix.clone()])]
        };
        let mut deps = BTreeSet::new();
        for (code, markers) in &sources {
            for marker in markers {
                for (i, _) in code.match_indices(marker.as_str()) {
                    let rest = &code[i + marker.len()..];
                    let names: Vec<String> = match rest.strip_prefix('{') {
                        Some(group) => group[..group.find('}').unwrap_or(group.len())]
                            .split(',')
                            .map(|p| ident(p.trim()))
                            .collect(),
                        None => vec![ident(rest)],
                    };
                    for n in names {
                        let target = if files.contains(&n) {
                            Some(n)
                        } else {
                            via_root.get(&n).cloned()
                        };
                        if let Some(target) = target.filter(|t| t != file) {
                            deps.insert(target);
                        }
                    }
                }
            }
        }
        graph.insert(file.clone(), deps);
    }
    graphs.insert(path.to_string(), graph);
}

#[test]
fn the_files_of_each_directory_module_import_each_other_without_a_circle() {
    let graphs = file_graphs(&support::workspace_root().join("host/src"));
    assert!(
        graphs.contains_key("accel")
            && graphs.contains_key("serve")
            && graphs.contains_key("serve/ratelimit"),
        "{graphs:?}"
    );
    // The pipeline and the HTTP translation are apart: routes uses execute, never the other
    // way; the rate-limit stores share the algorithm and not each other.
    assert!(graphs["serve"]["routes"].contains("execute"));
    assert!(!graphs["serve"]["execute"].contains("routes"));
    assert!(graphs["serve"]["execute"].contains("ratelimit"));
    let ratelimit = &graphs["serve/ratelimit"];
    assert_eq!(
        ratelimit["memory_store"],
        BTreeSet::from(["gcra".to_string()])
    );
    assert_eq!(ratelimit["redis_store"], BTreeSet::new());
    assert_eq!(ratelimit["gcra"], BTreeSet::new());
    for (dir, graph) in &graphs {
        assert_eq!(find_cycle(graph), None, "host/src/{dir}: {graph:#?}");
    }
}

#[test]
fn the_file_graph_sees_a_planted_circle_through_the_root() {
    let src = std::env::temp_dir().join(format!("wasm-infer-layout-{}", std::process::id()));
    let dir = src.join("planted");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write(
        "mod.rs",
        "mod a;\nmod b;\nmod c;\npub(crate) use b::{Thing, other};\npub struct Shared;\n",
    );
    // a -> b through the root's re-export, b -> a by path; c only uses the root.
    write("a.rs", "use super::{Shared, Thing};\npub fn helper() {}\n");
    write(
        "b.rs",
        "pub struct Thing;\npub fn other() { super::a::helper() }\n",
    );
    write(
        "c.rs",
        "// super::a::helper() in a comment is no edge\nuse super::Shared;\n",
    );
    let graphs = file_graphs(&src);
    std::fs::remove_dir_all(&src).unwrap();
    let graph = &graphs["planted"];
    assert_eq!(graph["c"], BTreeSet::new());
    assert_eq!(
        find_cycle(graph),
        Some(vec!["a".to_string(), "b".to_string(), "a".to_string()])
    );
}

#[test]
fn the_file_graph_sees_a_planted_circle_through_a_nested_directory_module() {
    let src = std::env::temp_dir().join(format!("wasm-infer-layout-n-{}", std::process::id()));
    let dir = src.join("outer");
    std::fs::create_dir_all(dir.join("inner")).unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.join(name), text).unwrap();
    write("mod.rs", "mod inner;\nmod a;\n");
    // a -> inner by path; inner (one of its files) -> a through `super::super::`.
    write("a.rs", "use super::inner::Thing;\n");
    write("inner/mod.rs", "mod x;\npub use x::Thing;\n");
    write(
        "inner/x.rs",
        "pub struct Thing;\nfn f() { super::super::a::g() }\n",
    );
    let graphs = file_graphs(&src);
    std::fs::remove_dir_all(&src).unwrap();
    assert_eq!(graphs["outer/inner"]["x"], BTreeSet::new());
    assert_eq!(
        find_cycle(&graphs["outer"]),
        Some(vec!["a".to_string(), "inner".to_string(), "a".to_string()])
    );
}

#[test]
fn main_only_parses_and_dispatches() {
    let main = support::workspace_root().join("host/src/bin/wasm-infer/main.rs");
    let lines = std::fs::read_to_string(main).unwrap().lines().count();
    // Each subcommand costs its `mod`, its variant (doc, attribute, variant) and its dispatch
    // arm; 125 leaves room for that and for no logic.
    assert!(lines < 125, "main.rs has {lines} lines");
}
