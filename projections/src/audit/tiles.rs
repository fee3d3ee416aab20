//! How the audit tree is laid out in storage: as tiles, the way transparency logs store theirs
//! (cf. Go's `golang.org/x/mod/sumdb/tlog` tiles). Tile `(level, index)` holds, left to right,
//! the hashes of tree nodes `(HEIGHT·level, j)` for `j` in `[WIDTH·index, WIDTH·(index + 1))`;
//! the `HEIGHT − 1` tree levels above them are recomputed from the tile, so a node costs one
//! tile read and at most `WIDTH − 1` hashes.
//!
//! Rules it enforces:
//! - A tile holds only complete nodes, as a prefix: its hashes never change once written, and
//!   a tile only ever grows until it holds `WIDTH` of them (full, immutable from then on).
//! - The cache keeps full tiles above the leaves only, so it is bounded by the shape of the
//!   tree (and by [`CACHE_TILES`]) and can never answer with a hash that later changes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use countersign_protocol::merkle::{HASH_LEN, Hash, NodeId, node_hash};

/// Tree levels per tile level: tile level `l` stores tree level `HEIGHT·l`.
pub(super) const HEIGHT: u8 = 4;
/// Hashes in a full tile: 16 × 32 bytes = 512 bytes, well below PostgreSQL's TOAST threshold,
/// so a tile is one heap tuple read.
pub(super) const WIDTH: usize = 1 << HEIGHT;
/// Most tiles the cache holds (≈ 40 MB with their maps): every tile above the leaves of a
/// 16 M-leaf tree; in larger trees the cache evicts at random.
const CACHE_TILES: usize = 1 << 16;

/// The address of a tile; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct TileId {
    pub level: u8,
    pub index: u64,
}

/// Where a tree node is kept: its tile, and the run of that tile's hashes it is the root of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    tile: TileId,
    offset: usize,
    count: usize,
}

fn slot(id: NodeId) -> Option<Slot> {
    let rise = id.level % HEIGHT;
    // The first node of the tile's level under `id`.
    let first = id.index.checked_mul(1 << rise)?;
    Some(Slot {
        tile: TileId {
            level: id.level / HEIGHT,
            index: first / WIDTH as u64,
        },
        offset: (first % WIDTH as u64) as usize,
        count: 1 << rise,
    })
}

/// The tiles holding `nodes`, each named once.
pub(super) fn tiles_for(nodes: &[NodeId]) -> Vec<TileId> {
    let mut tiles: Vec<TileId> = nodes
        .iter()
        .filter_map(|id| slot(*id))
        .map(|s| s.tile)
        .collect();
    tiles.sort_unstable();
    tiles.dedup();
    tiles
}

/// The root of the perfect subtree over `hashes` (a power of two of them, at most `WIDTH`).
fn perfect_root(hashes: &[Hash]) -> Option<Hash> {
    let mut layer = [[0u8; HASH_LEN]; WIDTH];
    let mut n = hashes.len();
    if !n.is_power_of_two() || n > WIDTH {
        return None;
    }
    layer.get_mut(..n)?.copy_from_slice(hashes);
    while n > 1 {
        for i in 0..n / 2 {
            let parent = node_hash(layer.get(2 * i)?, layer.get(2 * i + 1)?);
            *layer.get_mut(i)? = parent;
        }
        n /= 2;
    }
    layer.first().copied()
}

/// Tiles read for one question, answering for the nodes they hold.
#[derive(Debug, Default)]
pub(super) struct Tiles(pub HashMap<TileId, Arc<[Hash]>>);

impl Tiles {
    /// Whether these tiles hold every hash under node `id` (without hashing them).
    pub fn holds(&self, id: NodeId) -> bool {
        slot(id).is_some_and(|slot| {
            self.0
                .get(&slot.tile)
                .is_some_and(|tile| slot.offset + slot.count <= tile.len())
        })
    }

    /// The hash of node `id`, if these tiles hold every hash under it.
    pub fn node(&self, id: NodeId) -> Option<Hash> {
        let slot = slot(id)?;
        let tile = self.0.get(&slot.tile)?;
        perfect_root(tile.get(slot.offset..slot.offset.checked_add(slot.count)?)?)
    }
}

/// Full tiles above the leaves, shared by the clones of one `AuditTree`.
pub(super) struct TileCache(Mutex<HashMap<TileId, Arc<[Hash]>>>);

impl std::fmt::Debug for TileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TileCache({} tiles)", self.lock().len())
    }
}

impl TileCache {
    pub fn new() -> Self {
        Self(Mutex::new(HashMap::new()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TileId, Arc<[Hash]>>> {
        // The map is valid after any panic: every insert and remove is a single call.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn get(&self, id: TileId) -> Option<Arc<[Hash]>> {
        self.lock().get(&id).cloned()
    }

    /// Remembers `tile` if it can never change (full) and is not a leaf tile.
    pub fn keep(&self, id: TileId, tile: &Arc<[Hash]>) {
        if id.level == 0 || tile.len() != WIDTH {
            return;
        }
        let mut tiles = self.lock();
        if tiles.len() >= CACHE_TILES && !tiles.contains_key(&id) {
            // Random eviction: the map's iteration order is randomly seeded.
            if let Some(victim) = tiles.keys().next().copied() {
                tiles.remove(&victim);
            }
        }
        tiles.insert(id, Arc::clone(tile));
    }

    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// The new hashes an append adds to one tile, starting at `offset` (the hashes before it are
/// already stored).
#[derive(Debug, PartialEq, Eq)]
pub(super) struct TileWrite {
    pub tile: TileId,
    pub offset: usize,
    pub hashes: Vec<Hash>,
}

/// Groups the nodes an append completed (as `CompactRange::extend` reports them) by the tile
/// that stores them; nodes between tile levels are not stored.
pub(super) fn writes(completed: &[(NodeId, Hash)]) -> Vec<TileWrite> {
    let mut writes: BTreeMap<TileId, TileWrite> = BTreeMap::new();
    for (id, hash) in completed {
        if id.level % HEIGHT != 0 {
            continue;
        }
        let tile = TileId {
            level: id.level / HEIGHT,
            index: id.index / WIDTH as u64,
        };
        writes
            .entry(tile)
            .or_insert_with(|| TileWrite {
                tile,
                offset: (id.index % WIDTH as u64) as usize,
                hashes: Vec::with_capacity(WIDTH),
            })
            .hashes
            .push(*hash);
    }
    writes.into_values().collect()
}

/// A tile as stored: its hashes, concatenated.
pub(super) fn encode(hashes: &[Hash]) -> Vec<u8> {
    hashes.concat()
}

/// Reads a stored tile back; `None` if it is not 1 to `WIDTH` whole hashes.
pub(super) fn decode(bytes: &[u8]) -> Option<Arc<[Hash]>> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(HASH_LEN) || bytes.len() > WIDTH * HASH_LEN {
        return None;
    }
    bytes
        .chunks_exact(HASH_LEN)
        .map(|c| Hash::try_from(c).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use countersign_protocol::merkle::{CompactRange, MemoryTree, NodeSource, leaf_hash};

    use super::*;

    /// Tiles built from everything `extend` reports answer every complete node exactly as an
    /// in-memory tree does, for every level and at every size around tile boundaries.
    #[test]
    fn tiles_hold_every_complete_node() {
        let leaves: Vec<Hash> = (0u32..700).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        for size in [1usize, 15, 16, 17, 255, 256, 257, 700] {
            let mut range = CompactRange::new();
            let mut stored: HashMap<TileId, Vec<Hash>> = HashMap::new();
            // Uneven batches, so tiles are written partially and then completed.
            for batch in leaves[..size].chunks(7) {
                for write in writes(&range.extend(batch.iter().copied()).unwrap()) {
                    let tile = stored.entry(write.tile).or_default();
                    assert_eq!(tile.len(), write.offset, "{write:?} continues its tile");
                    tile.extend(write.hashes);
                }
            }
            let tiles = Tiles(
                stored
                    .into_iter()
                    .map(|(id, hashes)| (id, Arc::from(hashes)))
                    .collect(),
            );
            let memory = MemoryTree::from_leaf_hashes(leaves[..size].iter().copied());
            for level in 0..10u8 {
                let complete = size as u64 >> level;
                for index in 0..complete {
                    let id = NodeId::new(level, index);
                    assert_eq!(
                        tiles.node(id),
                        memory.node(id).ok(),
                        "node {id:?} at size {size}"
                    );
                }
                assert_eq!(tiles.node(NodeId::new(level, complete)), None, "incomplete");
                assert!(!tiles.holds(NodeId::new(level, complete)));
            }
        }
    }

    #[test]
    fn malformed_tiles_are_refused() {
        assert!(decode(&[]).is_none());
        assert!(decode(&[0; 33]).is_none());
        assert!(decode(&[0; 17 * 32]).is_none());
        assert_eq!(decode(&[1; 64]).map(|t| t.len()), Some(2));
    }
}
