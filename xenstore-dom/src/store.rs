//! The node tree: a persistent (copy-on-write) map from canonical path to node.
//!
//! Cloning a [`Tree`] is O(1) and shares every node, so a transaction's snapshot and each
//! request's scratch copy cost nothing until they write; a write copies O(log n) of the map.
//! The map is `rpds`' persistent red-black tree (`Arc`-shared, `no_std + alloc`): ordered
//! rather than hashed, so paths a domain chooses cannot degrade it (no hash flooding), and
//! `insert_mut`/`remove_mut` copy only the path of nodes still shared with a snapshot.
//! Invariants: `/` always exists; every node but `/` and the `@` specials is listed in its
//! parent's `children`; `children_bytes` is the sum of `name.len() + 1` over `children`.

use alloc::sync::Arc;
use alloc::vec::Vec;

use rpds::{RedBlackTreeMapSync, RedBlackTreeSetSync};

use crate::perms::{Perm, Perms};

/// One node. Shared between trees through `Arc`; modified by copying.
#[derive(Clone, Debug)]
pub struct Node {
    pub value: Arc<[u8]>,
    pub perms: Perms,
    pub children: RedBlackTreeSetSync<Arc<str>>,
    /// Bytes the child list takes in Xen's NUL-separated form.
    pub children_bytes: u32,
    /// Global generation of the last change (transaction conflicts, DIRECTORY_PART).
    pub generation: u64,
}

impl Node {
    pub fn new(perms: Perms, value: &[u8], generation: u64) -> Self {
        Node {
            value: Arc::from(value),
            perms,
            children: RedBlackTreeSetSync::new_sync(),
            children_bytes: 0,
            generation,
        }
    }

    /// Owner domain (first permission entry).
    pub fn owner(&self) -> u16 {
        self.perms.first().map_or(0, |p| p.id)
    }

    /// Xen's accounted node size: 16-byte header, 8 per permission, value, child names.
    pub fn acc_size(&self) -> usize {
        16 + 8 * self.perms.len() + self.value.len() + self.children_bytes as usize
    }

    /// Children in Xen's wire form: each name NUL-terminated.
    pub fn children_blob(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.children_bytes as usize);
        for c in &self.children {
            out.extend_from_slice(c.as_bytes());
            out.push(0);
        }
        out
    }
}

/// The whole store at one point in time.
#[derive(Clone, Debug)]
pub struct Tree {
    nodes: RedBlackTreeMapSync<Arc<str>, Arc<Node>>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree {
            nodes: RedBlackTreeMapSync::new_sync(),
        }
    }
}

impl Tree {
    /// Xen's initial store: `/`, `/tool`, `/tool/xenstored` and the two special watch nodes,
    /// all owned by domain 0 with no access for others.
    pub fn initial(generation: u64) -> Self {
        let perms: Perms = Arc::from([Perm {
            id: 0,
            access: crate::perms::NONE,
        }]);
        let mut t = Tree::default();
        for p in [
            "/",
            "/tool",
            "/tool/xenstored",
            "@releaseDomain",
            "@introduceDomain",
        ] {
            t.insert(p, Node::new(perms.clone(), b"", generation));
        }
        t.link_child("/", "tool");
        t.link_child("/tool", "xenstored");
        t
    }

    fn link_child(&mut self, dir: &str, name: &str) {
        if let Some(n) = self.get(dir) {
            let mut n = (*n).clone();
            n.children.insert_mut(Arc::from(name));
            n.children_bytes += name.len() as u32 + 1;
            self.insert(dir, n);
        }
    }

    pub fn get(&self, path: &str) -> Option<Arc<Node>> {
        self.nodes.get(path).cloned()
    }

    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }

    pub fn insert(&mut self, path: &str, node: Node) {
        self.nodes.insert_mut(Arc::from(path), Arc::new(node));
    }

    pub fn insert_arc(&mut self, path: Arc<str>, node: Arc<Node>) {
        self.nodes.insert_mut(path, node);
    }

    pub fn remove(&mut self, path: &str) -> Option<Arc<Node>> {
        let old = self.nodes.get(path).cloned()?;
        self.nodes.remove_mut(path);
        Some(old)
    }

    pub fn len(&self) -> usize {
        self.nodes.size()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Every (path, node), in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<Node>)> {
        self.nodes.iter()
    }
}
