//! Files uploaded into conversations: each is held by its conversation and leaves with it, kept
//! on disk (`<store.data_dir>/uploads`) or in memory, and counted against three byte budgets:
//! the conversation's, its bot's (over all the bot's conversations) and the node's.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::bots::Bot;
use crate::config::{ChannelConfig, UploadStorage};

/// The node's files: where they are kept and how many bytes they hold.
pub struct FileStore {
    /// The folder of files on disk; `None` keeps them in memory.
    dir: Option<PathBuf>,
    /// Bytes of files this node holds.
    // Relaxed: a standalone gauge compared against a budget; nothing is published with it.
    stored: AtomicUsize,
    max_stored: usize,
    per_bot: usize,
    per_conversation: usize,
    /// Uploads taken and refused (for `/metrics`).
    uploads: [AtomicU64; 2],
    /// Uploads being read now, at most `channel.max_concurrent_uploads`.
    reading: tokio::sync::Semaphore,
}

/// Why a file was not stored.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The conversation holds its budget.
    Conversation,
    /// The bot's conversations hold its budget.
    Bot,
    /// The node holds its budget.
    Node,
    /// The file could not be written.
    Io(String),
}

/// Where a file's bytes are.
enum Content {
    Memory(Bytes),
    Disk(PathBuf),
}

/// One stored file. Dropping the last handle frees its bytes from the bot's and the node's
/// budgets and removes its file.
pub struct StoredFile {
    /// The unguessable key in its URL.
    pub key: Box<str>,
    /// The file name the client gave.
    pub name: Box<str>,
    /// Its content type.
    pub content_type: Box<str>,
    /// Its size in bytes.
    pub size: usize,
    content: Content,
    store: Arc<FileStore>,
    bot: Arc<Bot>,
}

impl Drop for StoredFile {
    fn drop(&mut self) {
        self.store.stored.fetch_sub(self.size, Ordering::Relaxed);
        self.bot.control.free_upload(self.size);
        if let Content::Disk(path) = &self.content {
            // One unlink, at the end of a conversation or of a refused upload: a few
            // microseconds, not worth a blocking-pool hop.
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "An uploaded file could not be removed.");
            }
        }
    }
}

impl StoredFile {
    /// The file's bytes.
    pub async fn bytes(&self) -> std::io::Result<Bytes> {
        match &self.content {
            Content::Memory(b) => Ok(b.clone()),
            Content::Disk(path) => tokio::fs::read(path).await.map(Bytes::from),
        }
    }
}

/// The files one conversation holds.
#[derive(Default)]
pub struct Files {
    inner: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    files: Vec<Arc<StoredFile>>,
    bytes: usize,
}

impl Files {
    /// The file under `key`.
    pub fn get(&self, key: &str) -> Option<Arc<StoredFile>> {
        self.lock().files.iter().find(|f| &*f.key == key).cloned()
    }

    /// Removes the files under `keys` (an upload whose message was refused).
    pub fn remove(&self, keys: &[Box<str>]) {
        let removed: Vec<Arc<StoredFile>> = {
            let mut held = self.lock();
            let (gone, kept) =
                std::mem::take(&mut held.files).into_iter().partition(|f| keys.contains(&f.key));
            held.files = kept;
            held.bytes -= gone.iter().map(|f: &Arc<StoredFile>| f.size).sum::<usize>();
            gone
        };
        // Dropped outside the lock: the last handle unlinks its file.
        drop(removed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl FileStore {
    /// The node's store as configured: on disk, the folder `<data_dir>/uploads` is made and
    /// emptied (its files belonged to conversations of an earlier run, which no longer exist).
    pub fn open(config: &ChannelConfig, data_dir: &Path) -> std::io::Result<Self> {
        let dir = match config.upload_storage {
            UploadStorage::Memory => None,
            UploadStorage::Disk => {
                let dir = data_dir.join("uploads");
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                std::fs::create_dir_all(&dir)?;
                Some(dir)
            }
        };
        Ok(Self {
            dir,
            stored: AtomicUsize::new(0),
            max_stored: config.max_upload_bytes_stored,
            per_bot: config.max_upload_bytes_per_bot,
            per_conversation: config.max_upload_bytes_per_conversation,
            uploads: [AtomicU64::new(0), AtomicU64::new(0)],
            reading: tokio::sync::Semaphore::new(config.max_concurrent_uploads),
        })
    }

    /// A place to read one upload, if one is free: the bytes in flight are at most
    /// `channel.max_concurrent_uploads` × `channel.max_upload_bytes`.
    pub fn begin_upload(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.reading.try_acquire().ok()
    }

    /// Counts an upload request that was taken (`ok`) or refused.
    pub fn count_upload(&self, ok: bool) {
        self.uploads[usize::from(!ok)].fetch_add(1, Ordering::Relaxed);
    }

    /// Bytes of files this node holds.
    pub fn stored(&self) -> usize {
        self.stored.load(Ordering::Relaxed)
    }

    /// Stores a file in `files` (the conversation's) for `bot` under `key`, within the three
    /// budgets; nothing is held when it is refused.
    pub async fn put(
        self: &Arc<Self>,
        files: &Files,
        bot: &Arc<Bot>,
        key: &str,
        name: &str,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<Arc<StoredFile>, Refusal> {
        let size = bytes.len();
        // The conversation's budget is taken under its lock, the bot's and the node's by
        // compare-and-swap; each is given back when a later one refuses.
        {
            let mut held = files.lock();
            if held.bytes + size > self.per_conversation {
                return Err(Refusal::Conversation);
            }
            held.bytes += size;
        }
        let give_back = |to_bot: bool, to_node: bool| {
            files.lock().bytes -= size;
            if to_bot {
                bot.control.free_upload(size);
            }
            if to_node {
                self.stored.fetch_sub(size, Ordering::Relaxed);
            }
        };
        if !bot.control.hold_upload(size, self.per_bot) {
            give_back(false, false);
            return Err(Refusal::Bot);
        }
        let max = self.max_stored;
        if self
            .stored
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| (h + size <= max).then_some(h + size))
            .is_err()
        {
            give_back(true, false);
            return Err(Refusal::Node);
        }
        let content = match &self.dir {
            None => Content::Memory(bytes),
            Some(dir) => {
                let path = dir.join(key);
                if let Err(e) = tokio::fs::write(&path, &bytes).await {
                    let _ = tokio::fs::remove_file(&path).await;
                    give_back(true, true);
                    return Err(Refusal::Io(e.to_string()));
                }
                Content::Disk(path)
            }
        };
        let file = Arc::new(StoredFile {
            key: key.into(),
            name: name.into(),
            content_type: content_type.into(),
            size,
            content,
            store: self.clone(),
            bot: bot.clone(),
        });
        files.lock().files.push(file.clone());
        Ok(file)
    }
}

/// The store's figures on `/metrics`.
pub struct FileMetrics(pub Arc<FileStore>);

impl crate::telemetry::registry::ScrapeWriter for FileMetrics {
    fn write(&self, out: &mut String) {
        use std::fmt::Write;
        let s = &self.0;
        let _ = write!(
            out,
            "# HELP botgate_upload_bytes_stored Bytes of uploaded files this node holds.\n\
             # TYPE botgate_upload_bytes_stored gauge\n\
             botgate_upload_bytes_stored {}\n\
             # HELP botgate_uploads_total File uploads, by outcome.\n\
             # TYPE botgate_uploads_total counter\n\
             botgate_uploads_total{{outcome=\"stored\"}} {}\n\
             botgate_uploads_total{{outcome=\"refused\"}} {}\n",
            s.stored(),
            s.uploads[0].load(Ordering::Relaxed),
            s.uploads[1].load(Ordering::Relaxed),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn bot() -> Arc<Bot> {
        let c = Config::embedded_default().unwrap();
        Arc::new(Bot::from_config(&c.bots[0], "k".into(), 4))
    }

    fn store(per_conversation: usize, per_bot: usize, max_stored: usize) -> Arc<FileStore> {
        let config = ChannelConfig {
            upload_storage: UploadStorage::Memory,
            max_upload_bytes_per_conversation: per_conversation,
            max_upload_bytes_per_bot: per_bot,
            max_upload_bytes_stored: max_stored,
            ..ChannelConfig::default()
        };
        Arc::new(FileStore::open(&config, Path::new("unused")).unwrap())
    }

    async fn put(
        s: &Arc<FileStore>,
        f: &Files,
        bot: &Arc<Bot>,
        key: String,
        n: usize,
    ) -> Result<(), Refusal> {
        s.put(f, bot, &key, "x", "text/plain", Bytes::from(vec![0; n])).await.map(drop)
    }

    #[tokio::test]
    async fn each_budget_refuses_whole_files_and_dropping_frees_them() {
        let (bot, s) = (bot(), store(10, 15, 18));
        let (a, b, c) = (Files::default(), Files::default(), Files::default());
        assert_eq!(put(&s, &a, &bot, "a8".into(), 8).await, Ok(()));
        assert_eq!(
            put(&s, &a, &bot, "a3".into(), 3).await,
            Err(Refusal::Conversation),
            "8 + 3 > 10 in one conversation"
        );
        assert_eq!(put(&s, &b, &bot, "b7".into(), 7).await, Ok(()));
        assert_eq!(put(&s, &b, &bot, "b1".into(), 1).await, Err(Refusal::Bot), "8 + 7 + 1 > 15 for the bot");
        assert_eq!((s.stored(), bot.control.uploaded()), (15, 15));
        // Another bot's files count against the node only.
        let other = {
            let c = Config::embedded_default().unwrap();
            Arc::new(Bot::from_config(&c.bots[0], "k2".into(), 4))
        };
        assert_eq!(s.put(&c, &other, "c1", "x", "t/p", Bytes::from(vec![0; 3])).await.map(drop), Ok(()));
        assert_eq!(
            s.put(&c, &other, "c2", "x", "t/p", Bytes::from(vec![0; 1])).await.map(drop),
            Err(Refusal::Node)
        );
        // A refused file holds nothing; a removed one gives its bytes back everywhere.
        assert_eq!((s.stored(), bot.control.uploaded(), other.control.uploaded()), (18, 15, 3));
        a.remove(&["a8".into()]);
        assert!(a.get("a8").is_none());
        assert_eq!((s.stored(), bot.control.uploaded()), (10, 7));
        drop(b);
        assert_eq!((s.stored(), bot.control.uploaded()), (3, 0));
        assert_eq!(put(&s, &a, &bot, "a10".into(), 10).await, Ok(()));
    }
}
