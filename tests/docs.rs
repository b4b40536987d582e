//! The documentation stays findable and true: the README is short and links to every page of
//! `docs/`, every relative link (and its `#anchor`) resolves, and every figure quoted with a
//! golden key (`35,717,723 fuel <!-- golden: minilm_short_bench -->`) equals that key in
//! `tests/golden/fuel.json`; in the README every fuel figure must carry one. Each check is also
//! run once on a planted fault, so that it is known to fail when it should.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod support;

/// The README's length limit: what it is and for whom, setup, one CLI run, the limits and exit
/// tables, a library example, `serve` in five lines and links; the rest lives in `docs/`.
const README_MAX_LINES: usize = 300;

fn root() -> PathBuf {
    support::workspace_root()
}

/// The Markdown files the project publishes.
fn pages() -> Vec<PathBuf> {
    let mut pages = vec![
        root().join("README.md"),
        root().join("SECURITY.md"),
        root().join("vendor/README.md"),
    ];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// Text outside fenced code blocks, line by line (links and headings in code are not links).
fn prose(text: &str) -> Vec<(usize, &str)> {
    let mut fenced = false;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push((n + 1, line));
        }
    }
    out
}

/// GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            '-' | '_' => Some(c),
            c if c.is_alphanumeric() => Some(c.to_lowercase().next().unwrap()),
            _ => None,
        })
        .collect()
}

fn anchors(text: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (_, line) in prose(text) {
        let level = line.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&level) && line[level..].starts_with(' ') {
            let base = slug(&line[level..]);
            let n = seen.entry(base.clone()).or_insert(0);
            out.push(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
    }
    out
}

/// Every relative link of `text` (a page at `path`): `(line, target)`.
fn links(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in prose(text) {
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            rest = &rest[at + 2..];
            let Some(end) = rest.find(')') else { break };
            let target = &rest[..end];
            if !target.contains("://") && !target.starts_with("mailto:") {
                out.push((n, target.to_string()));
            }
            rest = &rest[end..];
        }
    }
    out
}

/// The broken links of the page at `path` whose text is `text`.
fn broken_links(path: &Path, text: &str) -> Vec<String> {
    let mut broken = Vec::new();
    for (line, target) in links(text) {
        let (file, anchor) = match target.split_once('#') {
            Some((file, anchor)) => (file, Some(anchor)),
            None => (target.as_str(), None),
        };
        let resolved = if file.is_empty() {
            path.to_path_buf()
        } else {
            path.parent().unwrap().join(file)
        };
        if !resolved.exists() {
            broken.push(format!(
                "{}:{line}: {target} (no such file)",
                path.display()
            ));
            continue;
        }
        if let Some(anchor) = anchor {
            let target_text = std::fs::read_to_string(&resolved).unwrap_or_default();
            if !anchors(&target_text).iter().any(|a| a == anchor) {
                broken.push(format!(
                    "{}:{line}: {target} (no such heading)",
                    path.display()
                ));
            }
        }
    }
    broken
}

fn golden() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(root().join("tests/golden/fuel.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// A number as the docs write it (`35,717,723`).
fn number(text: &str) -> Option<u64> {
    text.replace(',', "").parse().ok()
}

/// Figures tagged `<!-- golden: KEY -->` that differ from the golden file, and (with `strict`)
/// fuel figures of a million or more that carry no tag.
fn figure_faults(
    name: &str,
    text: &str,
    golden: &BTreeMap<String, u64>,
    strict: bool,
) -> Vec<String> {
    const TAG: &str = "<!-- golden: ";
    let mut faults = Vec::new();
    for (line, content) in prose(text) {
        // Tagged figures: the last number before each tag.
        let mut rest = content;
        let mut consumed = 0;
        while let Some(at) = rest.find(TAG) {
            let before = &content[..consumed + at];
            let after = &rest[at + TAG.len()..];
            let key = after.split(" -->").next().unwrap_or("");
            let figure = before
                .rsplit(|c: char| !(c.is_ascii_digit() || c == ','))
                .find(|w| w.chars().any(|c| c.is_ascii_digit()))
                .and_then(|w| number(w.trim_matches(',')));
            match (figure, golden.get(key)) {
                (_, None) => faults.push(format!("{name}:{line}: no golden key {key:?}")),
                (None, _) => faults.push(format!("{name}:{line}: no figure before the tag {key}")),
                (Some(figure), Some(&want)) if figure != want => faults.push(format!(
                    "{name}:{line}: {figure} quoted for {key}, the golden figure is {want}"
                )),
                _ => {}
            }
            consumed += at + TAG.len();
            rest = &rest[at + TAG.len()..];
        }
        if strict {
            // Untagged: `d,ddd,ddd fuel` (a million or more) with no tag right after it.
            let words: Vec<&str> = content.split_whitespace().collect();
            for (i, pair) in words.windows(2).enumerate() {
                let figure = pair[0].trim_matches(|c: char| !c.is_ascii_digit());
                let is_big = figure.matches(',').count() >= 2 && number(figure).is_some();
                if is_big && pair[1].starts_with("fuel") {
                    let tagged = words.get(i + 2).is_some_and(|w| *w == "<!--");
                    if !tagged {
                        faults.push(format!(
                            "{name}:{line}: {figure} fuel has no <!-- golden: KEY --> tag"
                        ));
                    }
                }
            }
        }
    }
    faults
}

#[test]
fn the_readme_is_short_and_links_every_docs_page() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines (at most {README_MAX_LINES}: move detail to docs/)"
    );
    let linked: Vec<String> = links(&readme).into_iter().map(|(_, t)| t).collect();
    for page in pages()
        .iter()
        .filter(|p| p.starts_with(root().join("docs")))
    {
        let name = format!("docs/{}", page.file_name().unwrap().to_string_lossy());
        assert!(
            linked
                .iter()
                .any(|t| t.split('#').next() == Some(name.as_str())),
            "README.md does not link {name}"
        );
    }
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        broken.extend(broken_links(&page, &text));
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));

    // A planted broken file and a planted broken anchor are found.
    let readme = root().join("README.md");
    let planted =
        "see [x](docs/nowhere.md) and [y](docs/cli.md#no-such-heading) and [z](docs/cli.md)";
    let found = broken_links(&readme, planted);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].contains("docs/nowhere.md (no such file)"));
    assert!(found[1].contains("docs/cli.md#no-such-heading (no such heading)"));
}

#[test]
fn every_golden_figure_quoted_in_the_docs_matches_the_golden_file() {
    let golden = golden();
    let mut faults = Vec::new();
    let mut tagged = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.strip_prefix(root()).unwrap().display().to_string();
        tagged += text.matches("<!-- golden: ").count();
        faults.extend(figure_faults(&name, &text, &golden, name == "README.md"));
    }
    assert!(
        faults.is_empty(),
        "figures that drifted:\n{}",
        faults.join("\n")
    );
    assert!(tagged >= 3, "only {tagged} golden figures are tagged");

    // A planted drift, an unknown key and an untagged README fuel figure are found.
    let planted = "costs 35,717,724 fuel <!-- golden: minilm_short_bench --> and \
                   1 fuel <!-- golden: no_such_key --> and 12,345,678 fuel untagged";
    let found = figure_faults("planted", planted, &golden, true);
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(
        found[0].contains("35717724 quoted for minilm_short_bench"),
        "{found:?}"
    );
    assert!(
        found[1].contains("no golden key \"no_such_key\""),
        "{found:?}"
    );
    assert!(found[2].contains("12,345,678 fuel has no"), "{found:?}");
}
