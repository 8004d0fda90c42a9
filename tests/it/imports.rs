//! No import circles, at any level, in any crate of the workspace.
//!
//! Every `use` and every path written in the code (test code excluded: `#[cfg(test)]` items and
//! test modules may reach anywhere) is resolved, through `pub use` re-exports, to the file that
//! defines what it names. Two graphs must then be acyclic in each crate:
//! - files: one node per module file; an edge for each file naming something of another file;
//! - folders: at every folder, one node per child (a file, or a subfolder with all it holds);
//!   an edge where anything in one child names anything in another.
//!
//! A module and its own ancestors (`mod.rs` and the files of its folder, `lib.rs` and the rest)
//! are the parent/child relation Rust modules are made of, not an import between peers: those
//! edges are left out, and everything else counts. Circles between crates the compiler refuses.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

type ModPath = Vec<String>;

/// A crate's module tree and what each module's file re-exports.
#[derive(Default)]
struct Crate {
    /// Every module with a file, by module path ([] is the crate root).
    files: BTreeMap<ModPath, PathBuf>,
    /// Inline (non-test) modules too: they resolve paths but are part of their file.
    modules: BTreeSet<ModPath>,
    /// `pub use` (any visibility) re-exports: module → (name it is known by → target path).
    reexports: BTreeMap<ModPath, BTreeMap<String, ModPath>>,
    /// `pub use x::*` glob re-exports: module → the modules globbed.
    globs: BTreeMap<ModPath, Vec<ModPath>>,
    /// Paths each file names, already absolute (crate-relative), with the naming file.
    named: Vec<(ModPath, ModPath)>,
}

fn has_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg") && {
            let mut test = false;
            let _ = a.parse_nested_meta(|m| {
                test |= m.path.is_ident("test");
                Ok(())
            });
            test
        }
    })
}

/// The module path of a source file under `src`.
fn module_of(src: &Path, file: &Path) -> ModPath {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> =
        rel.iter().map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Walks one file: records its module declarations, re-exports and every path it names.
struct Walker<'a> {
    krate: &'a mut Crate,
    /// The file's module, then inline modules entered.
    here: ModPath,
    file: ModPath,
    /// Child modules declared `#[cfg(test)] mod x;` (their files are test code).
    test_children: &'a mut BTreeSet<ModPath>,
    /// The first pass only collects inline modules (so relative paths can be told apart).
    collecting: bool,
}

impl Walker<'_> {
    /// Absolute path of `segments` written in module `here` (None: another crate or std).
    fn absolute(&self, segments: &[String]) -> Option<ModPath> {
        let mut base = self.here.clone();
        let mut rest = segments;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                base.clear();
                rest = &rest[1..];
            }
            Some("self") => rest = &rest[1..],
            Some("super") => {
                while rest.first().map(String::as_str) == Some("super") {
                    base.pop()?;
                    rest = &rest[1..];
                }
            }
            Some(first) => {
                // A path relative to this module: only when its first segment is a child module.
                let mut child = base.clone();
                child.push(first.to_string());
                if !self.krate.modules.contains(&child) {
                    return None;
                }
            }
            None => return None,
        }
        base.extend(rest.iter().cloned());
        Some(base)
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree, public: bool) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree, public);
                prefix.pop();
            }
            syn::UseTree::Name(n) => self.use_leaf(prefix, &n.ident.to_string(), None, public),
            syn::UseTree::Rename(r) => {
                self.use_leaf(prefix, &r.ident.to_string(), Some(r.rename.to_string()), public)
            }
            syn::UseTree::Glob(_) => {
                if let Some(target) = self.absolute(prefix) {
                    if public {
                        self.krate.globs.entry(self.here.clone()).or_default().push(target.clone());
                    }
                    self.krate.named.push((self.file.clone(), target));
                }
            }
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t, public);
                }
            }
        }
    }

    fn use_leaf(&mut self, prefix: &[String], name: &str, rename: Option<String>, public: bool) {
        let mut full = prefix.to_vec();
        if name != "self" {
            full.push(name.to_string());
        }
        let Some(target) = self.absolute(&full) else { return };
        if public {
            let known = rename.unwrap_or_else(|| full.last().cloned().unwrap_or_default());
            self.krate
                .reexports
                .entry(self.here.clone())
                .or_default()
                .insert(known, target.clone());
        }
        self.krate.named.push((self.file.clone(), target));
    }
}

impl<'ast> Visit<'ast> for Walker<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs: &[syn::Attribute] = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            syn::Item::Struct(s) => &s.attrs,
            syn::Item::Enum(e) => &e.attrs,
            syn::Item::Const(c) => &c.attrs,
            syn::Item::Static(s) => &s.attrs,
            syn::Item::Trait(t) => &t.attrs,
            syn::Item::Type(t) => &t.attrs,
            syn::Item::Macro(m) => &m.attrs,
            _ => &[],
        };
        if has_cfg_test(attrs) {
            if let syn::Item::Mod(m) = item {
                let mut child = self.here.clone();
                child.push(m.ident.to_string());
                self.test_children.insert(child);
            }
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        let mut child = self.here.clone();
        child.push(m.ident.to_string());
        self.krate.modules.insert(child.clone());
        if m.content.is_some() {
            let outer = std::mem::replace(&mut self.here, child);
            syn::visit::visit_item_mod(self, m);
            self.here = outer;
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if self.collecting {
            return;
        }
        let public = !matches!(u.vis, syn::Visibility::Inherited);
        self.use_tree(&mut Vec::new(), &u.tree, public);
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        if !self.collecting && p.leading_colon.is_none() {
            let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
            if let Some(target) = (segments.len() > 1).then(|| self.absolute(&segments)).flatten() {
                self.krate.named.push((self.file.clone(), target));
            }
        }
        syn::visit::visit_path(self, p);
    }
}

impl Crate {
    fn read(src: &Path) -> Crate {
        let mut files = Vec::new();
        rust_files(src, &mut files);
        let parsed: Vec<(ModPath, syn::File)> = files
            .iter()
            .map(|f| {
                let text = std::fs::read_to_string(f).unwrap();
                let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                (module_of(src, f), ast)
            })
            .collect();
        let mut krate = Crate::default();
        let mut tests = BTreeSet::new();
        for (m, _) in &parsed {
            krate.modules.insert(m.clone());
        }
        // First pass: inline modules and test modules; second: uses and paths.
        for collecting in [true, false] {
            for (m, ast) in &parsed {
                let mut w = Walker {
                    krate: &mut krate,
                    here: m.clone(),
                    file: m.clone(),
                    test_children: &mut tests,
                    collecting,
                };
                w.visit_file(ast);
            }
        }
        for ((m, _), f) in parsed.iter().zip(&files) {
            if !tests.iter().any(|t| m.starts_with(t)) {
                krate.files.insert(m.clone(), f.clone());
            }
        }
        krate.named.retain(|(from, _)| !tests.iter().any(|t| from.starts_with(t)));
        krate
    }

    /// The file that defines what `path` names, following re-exports.
    fn resolve(&self, path: &[String], depth: usize) -> Option<ModPath> {
        if depth > 32 {
            return None;
        }
        // The longest prefix that is a module.
        let mut module: ModPath = Vec::new();
        let mut i = 0;
        while i < path.len() {
            let mut next = module.clone();
            next.push(path[i].clone());
            if !self.modules.contains(&next) {
                break;
            }
            module = next;
            i += 1;
        }
        if i < path.len() {
            let name = &path[i];
            if let Some(target) = self.reexports.get(&module).and_then(|r| r.get(name)) {
                let mut t = target.clone();
                t.extend(path[i + 1..].iter().cloned());
                if t != path {
                    return self.resolve(&t, depth + 1);
                }
            }
            // Not re-exported by name: through a glob re-export if there is one (the first).
            if let Some(glob) = self.globs.get(&module).and_then(|g| g.first()) {
                let mut t = glob.clone();
                t.extend(path[i..].iter().cloned());
                return self.resolve(&t, depth + 1);
            }
        }
        // Inline modules belong to their file.
        while !self.files.contains_key(&module) {
            module.pop()?;
        }
        Some(module)
    }

    /// File-level edges, ancestor/descendant pairs left out.
    fn edges(&self) -> BTreeSet<(ModPath, ModPath)> {
        let mut out = BTreeSet::new();
        for (from, path) in &self.named {
            let Some(to) = self.resolve(path, 0) else { continue };
            let from = self.file_of(from);
            if from.starts_with(&to) || to.starts_with(&from) {
                continue;
            }
            out.insert((from, to));
        }
        out
    }

    fn file_of(&self, m: &ModPath) -> ModPath {
        let mut m = m.clone();
        while !self.files.contains_key(&m) && !m.is_empty() {
            m.pop();
        }
        m
    }
}

/// Circles (strongly connected components with more than one node) of a graph.
fn circles(nodes: &BTreeSet<ModPath>, edges: &BTreeSet<(ModPath, ModPath)>) -> Vec<Vec<ModPath>> {
    let index: BTreeMap<&ModPath, usize> = nodes.iter().enumerate().map(|(i, n)| (n, i)).collect();
    let names: Vec<&ModPath> = nodes.iter().collect();
    let mut adj = vec![Vec::new(); nodes.len()];
    for (a, b) in edges {
        if let (Some(&i), Some(&j)) = (index.get(a), index.get(b)) {
            adj[i].push(j);
        }
    }
    // Reachability by DFS from each node is enough at this size (hundreds of nodes).
    let reach = |s: usize| {
        let mut seen = vec![false; adj.len()];
        let mut stack = vec![s];
        while let Some(v) = stack.pop() {
            for &w in &adj[v] {
                if !seen[w] {
                    seen[w] = true;
                    stack.push(w);
                }
            }
        }
        seen
    };
    let reach: Vec<Vec<bool>> = (0..adj.len()).map(reach).collect();
    let mut done = vec![false; adj.len()];
    let mut out = Vec::new();
    for i in 0..adj.len() {
        if done[i] || !reach[i][i] {
            continue;
        }
        let scc: Vec<usize> = (0..adj.len()).filter(|&j| reach[i][j] && reach[j][i]).collect();
        scc.iter().for_each(|&j| done[j] = true);
        out.push(scc.into_iter().map(|j| names[j].clone()).collect());
    }
    out
}

fn show(m: &ModPath) -> String {
    if m.is_empty() { "(root)".into() } else { m.join("::") }
}

/// The top-level modules by layer (a module's layer is one above the highest it uses), when
/// there is no circle among them: what docs/architecture.md's layer tables show.
fn layers(nodes: &BTreeSet<ModPath>, edges: &BTreeSet<(ModPath, ModPath)>) -> Vec<Vec<String>> {
    let mut layer: BTreeMap<&ModPath, usize> = BTreeMap::new();
    for _ in 0..=nodes.len() {
        for n in nodes {
            let mut above =
                edges.iter().filter(|(a, _)| a == n).map(|(_, b)| layer.get(b).map(|l| l + 1));
            let l = above.try_fold(0, |acc, l| Some(acc.max(l?)));
            if let Some(l) = l {
                layer.insert(n, l);
            }
        }
    }
    let mut out = vec![Vec::new(); layer.values().max().map_or(0, |m| m + 1)];
    for (n, l) in layer {
        out[l].push(show(n));
    }
    out
}

/// Checks one crate; returns (files, folders, circle descriptions, its top-level layers).
fn check(src: &Path) -> (usize, usize, Vec<String>, Vec<Vec<String>>) {
    let krate = Crate::read(src);
    let edges = krate.edges();
    let files: BTreeSet<ModPath> = krate.files.keys().cloned().collect();
    let mut found: Vec<String> = circles(&files, &edges)
        .iter()
        .map(|c| format!("files: {}", c.iter().map(show).collect::<Vec<_>>().join(" ↔ ")))
        .collect();
    let folders: BTreeSet<ModPath> = files
        .iter()
        .filter(|f| files.iter().any(|g| g.len() == f.len() + 1 && g.starts_with(f)))
        .cloned()
        .collect();
    let mut top = Vec::new();
    for folder in &folders {
        let child = |m: &ModPath| -> Option<ModPath> {
            (m.len() > folder.len() && m.starts_with(folder)).then(|| m[..=folder.len()].to_vec())
        };
        let nodes: BTreeSet<ModPath> = files.iter().filter_map(child).collect();
        let lifted: BTreeSet<(ModPath, ModPath)> = edges
            .iter()
            .filter_map(|(a, b)| Some((child(a)?, child(b)?)))
            .filter(|(a, b)| a != b)
            .collect();
        for c in circles(&nodes, &lifted) {
            let names: Vec<String> = c.iter().map(|m| m.last().unwrap().clone()).collect();
            found.push(format!("folder {}: {}", show(folder), names.join(" ↔ ")));
        }
        if folder.is_empty() && found.is_empty() {
            top = layers(&nodes, &lifted);
        }
    }
    (files.len(), folders.len(), found, top)
}

#[test]
fn no_import_circles_in_any_crate_at_any_level() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut all = Vec::new();
    for src in ["src", "crates/checkpoint/src", "crates/engine/src"] {
        let (files, folders, found, top) = check(&root.join(src));
        println!("{src}: {files} files, {folders} folders, {} circles", found.len());
        for f in &found {
            println!("  {f}");
        }
        for (i, layer) in top.iter().enumerate() {
            println!("  layer {i}: {}", layer.join(", "));
        }
        assert!(files > 1, "{src}: no files read");
        all.extend(found.into_iter().map(|f| format!("{src}: {f}")));
    }
    assert!(all.is_empty(), "import circles:\n{}", all.join("\n"));
}

#[test]
fn the_circle_check_sees_a_planted_circle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir(src.join("a")).unwrap();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").unwrap();
    std::fs::write(src.join("a/mod.rs"), "mod x;\nmod y;\npub use x::X;\n").unwrap();
    std::fs::write(src.join("a/x.rs"), "pub struct X;\nfn f() { let _ = super::y::Y; }\n").unwrap();
    // y names X through the parent's re-export: still a circle between x and y.
    std::fs::write(src.join("a/y.rs"), "pub struct Y;\nuse super::X;\n").unwrap();
    std::fs::write(
        src.join("b.rs"),
        "use crate::a::X;\n#[cfg(test)]\nmod tests { use crate::b; }\n",
    )
    .unwrap();
    let (files, folders, found, _) = check(src);
    assert_eq!((files, folders), (5, 2));
    assert_eq!(found, ["files: a::x ↔ a::y", "folder a: x ↔ y"], "{found:?}");
}
