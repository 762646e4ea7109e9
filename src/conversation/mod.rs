//! Conversation state: the ordered activity log with its watermark, expiry, and the
//! per-conversation handles resolved when the conversation started.

pub mod files;
pub mod registry;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::bots::Bot;
use crate::channel::token::Claims;
use crate::clock::Millis;
use crate::metering::ConversationMeter;

/// Typing indicators kept per conversation: at most one per this many milliseconds.
pub const TYPING_EVERY_MS: Millis = 1000;

/// One conversation between a bot user and a bot.
pub struct Conversation {
    /// The conversation id.
    pub id: Arc<str>,
    /// The bot, resolved when the conversation started.
    pub bot: Arc<Bot>,
    /// The billing handles and session state, resolved when the conversation started.
    pub meter: ConversationMeter,
    /// Time of the last user message (or of the start), for idle expiry.
    // Relaxed: a standalone timestamp; expiry tolerates reading a slightly old value.
    last_user_ms: AtomicI64,
    /// Bumped by each new WebSocket; an older socket that sees a newer value closes.
    socket_generation: AtomicU64,
    /// When the last typing indicator was kept (ms; `i64::MIN` for none).
    last_typing_ms: AtomicI64,
    /// The log. A std mutex: held only to append or copy out, never across an await.
    log: Mutex<Log>,
    /// Wakes WebSocket streams when the log grows.
    notify: Notify,
    /// The last token verified for this conversation, so its next requests skip the HMAC.
    verified: arc_swap::ArcSwapOption<VerifiedToken>,
    /// For a test chat, the author's user key it counts against (`claims.user`).
    pub test_author: Option<Box<str>>,
    /// The files uploaded into it; they leave memory (and disk) with it.
    pub files: files::Files,
}

/// A token and the claims its signature proved.
struct VerifiedToken {
    token: Box<str>,
    claims: Arc<Claims>,
}

/// The retained activities; `base` is the watermark of the first retained one.
struct Log {
    items: VecDeque<Arc<str>>,
    /// The bytes of `items`.
    bytes: usize,
    base: u64,
    last_ts: Millis,
    ended: bool,
    greeted: bool,
    retention: Retention,
}

/// What a conversation keeps: at most this many activities and bytes (the newest is always
/// kept, whatever its size; the body limit bounds it).
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Activities kept at most.
    pub activities: usize,
    /// Bytes of activity JSON kept at most.
    pub bytes: usize,
}

/// How much one answer (a poll, a WebSocket frame) carries at most: at least one activity, then
/// up to this many activities and bytes.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Activities per answer at most.
    pub activities: usize,
    /// Bytes of activities per answer at most.
    pub bytes: usize,
}

impl Page {
    /// No bound (tests and benches).
    pub const ALL: Page = Page { activities: usize::MAX, bytes: usize::MAX };
}

/// An activity appended to the log.
#[derive(Debug, Clone)]
pub struct Appended {
    /// Its id.
    pub id: String,
    /// Its timestamp.
    pub ts: Millis,
    /// Its JSON as stored (shared with the log).
    pub json: Arc<str>,
}

impl Drop for Conversation {
    fn drop(&mut self) {
        // What the conversation held leaves the bot's count with it, however it left memory.
        let bytes = self.log.get_mut().map_or_else(|p| p.into_inner().bytes, |l| l.bytes);
        self.bot.control.retain(0, bytes);
    }
}

impl Conversation {
    /// A new, empty conversation.
    pub fn new(
        id: Arc<str>,
        bot: Arc<Bot>,
        meter: ConversationMeter,
        now: Millis,
        retention: Retention,
    ) -> Self {
        Self {
            id,
            bot,
            meter,
            last_user_ms: AtomicI64::new(now),
            socket_generation: AtomicU64::new(0),
            last_typing_ms: AtomicI64::new(i64::MIN),
            log: Mutex::new(Log {
                items: VecDeque::new(),
                bytes: 0,
                base: 0,
                last_ts: 0,
                ended: false,
                greeted: false,
                retention,
            }),
            notify: Notify::new(),
            verified: arc_swap::ArcSwapOption::empty(),
            test_author: None,
            files: files::Files::default(),
        }
    }

    /// Marks a test chat of `author` (counted against the author's cap of test chats).
    pub fn with_test_author(mut self, author: Option<&str>) -> Self {
        self.test_author = author.map(Into::into);
        self
    }

    /// The claims of `token` if it is the token this conversation last verified and it has not
    /// expired (the bot's publishing and secret generation are still checked by the caller).
    pub fn verified_token(&self, token: &str, now_secs: i64) -> Option<Arc<Claims>> {
        let v = self.verified.load();
        let v = v.as_ref()?;
        (v.token.as_bytes() == token.as_bytes() && v.claims.exp > now_secs).then(|| v.claims.clone())
    }

    /// Remembers a token whose signature was just checked for this conversation.
    pub fn remember_token(&self, token: &str, claims: Arc<Claims>) {
        if claims.conversation.as_str() == &*self.id {
            self.verified.store(Some(Arc::new(VerifiedToken { token: token.into(), claims })));
        }
    }

    /// Whether a typing indicator at `now` is kept: at most one per `TYPING_EVERY_MS` (clients
    /// send one every few seconds while a person types; a flood of them is acknowledged and
    /// dropped, never stored).
    pub fn take_typing(&self, now: Millis) -> bool {
        // Relaxed: the CAS decides on this one value; nothing else is published with it.
        let last = self.last_typing_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= TYPING_EVERY_MS
            && self.last_typing_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends an activity: assigns its id and a timestamp that is never earlier than `not_before`,
    /// than `now`, or than the previous activity's, lets `build` serialize it with them, and wakes
    /// the streams.
    pub fn append(
        &self,
        now: Millis,
        not_before: Millis,
        build: impl FnOnce(&str, Millis) -> String,
    ) -> Appended {
        let appended = {
            let mut log = self.lock();
            let seq = log.base + log.items.len() as u64;
            // `{conversation}|{seq:07}`, written by hand: `format!` was 3% of a message.
            let mut id = String::with_capacity(self.id.len() + 12);
            id.push_str(&self.id);
            id.push('|');
            let mut digits = itoa::Buffer::new();
            let digits = digits.format(seq);
            for _ in digits.len()..7 {
                id.push('0');
            }
            id.push_str(digits);
            // Strictly increasing: clients order the transcript by timestamp.
            let ts = now.max(not_before).max(log.last_ts + 1);
            log.last_ts = ts;
            let json: Arc<str> = Arc::from(build(&id, ts));
            let added = json.len();
            let mut freed = 0;
            log.bytes += added;
            log.items.push_back(json.clone());
            while log.items.len() > 1
                && (log.items.len() > log.retention.activities || log.bytes > log.retention.bytes)
                && let Some(old) = log.items.pop_front()
            {
                log.bytes -= old.len();
                freed += old.len();
                log.base += 1;
            }
            self.bot.control.retain(added, freed);
            Appended { id, ts, json }
        };
        self.notify.notify_waiters();
        appended
    }

    /// The ActivitySet JSON of the activities from `watermark` on, at most one `page` of them,
    /// and the watermark after the last one sent (the next poll continues there).
    pub fn activities_since(&self, watermark: u64, page: Page) -> (String, u64) {
        let log = self.lock();
        let from = watermark.clamp(log.base, log.base + log.items.len() as u64);
        let skip = (from - log.base) as usize;
        let (mut count, mut len) = (0usize, 0usize);
        for a in log.items.iter().skip(skip) {
            if count > 0 && (count == page.activities || len + a.len() > page.bytes) {
                break;
            }
            count += 1;
            len += a.len() + 1;
        }
        let end = from + count as u64;
        let mut out = String::with_capacity(len + 48);
        out.push_str("{\"activities\":[");
        for (i, a) in log.items.iter().skip(skip).take(count).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(a);
        }
        out.push_str("],\"watermark\":\"");
        out.push_str(itoa::Buffer::new().format(end));
        out.push_str("\"}");
        (out, end)
    }

    /// The watermark after the last activity.
    pub fn watermark(&self) -> u64 {
        let log = self.lock();
        log.base + log.items.len() as u64
    }

    /// A future that completes at the next append; create it before reading so none is missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }

    /// Records a user message for idle expiry.
    pub fn touch(&self, now: Millis) {
        self.last_user_ms.store(now, Ordering::Relaxed);
    }

    /// Time of the last user message (or of the start).
    pub fn last_user_ms(&self) -> Millis {
        self.last_user_ms.load(Ordering::Relaxed)
    }

    /// Marks the conversation ended (End of Conversation); further user messages are refused.
    pub fn end(&self) {
        self.lock().ended = true;
    }

    /// Whether the conversation has ended.
    pub fn ended(&self) -> bool {
        self.lock().ended
    }

    /// Marks the greeting sent; returns whether it had not been sent yet.
    pub fn mark_greeted(&self) -> bool {
        !std::mem::replace(&mut self.lock().greeted, true)
    }

    /// Registers a new WebSocket; older sockets of this conversation close at their next wake.
    pub fn new_socket(&self) -> u64 {
        // AcqRel: the new generation must be visible to the old socket after it is woken.
        let generation = self.socket_generation.fetch_add(1, Ordering::AcqRel) + 1;
        self.notify.notify_waiters();
        generation
    }

    /// Whether `generation` is still the newest socket.
    pub fn socket_current(&self, generation: u64) -> bool {
        self.socket_generation.load(Ordering::Acquire) == generation
    }

    /// Wakes every stream (used at shutdown and when the conversation ends).
    pub fn wake(&self) {
        self.notify.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn conv(max: usize) -> Conversation {
        let c = Config::embedded_default().unwrap();
        let bot = Arc::new(Bot::from_config(&c.bots[0], "k".into(), 1));
        Conversation::new(
            Arc::from("c1"),
            bot,
            ConversationMeter::unmetered(),
            1000,
            Retention { activities: max, bytes: usize::MAX },
        )
    }

    #[test]
    fn ids_watermarks_and_timestamps() {
        let c = conv(10);
        let a = c.append(1000, 0, |id, ts| format!("{{\"id\":\"{id}\",\"ts\":{ts}}}"));
        let b = c.append(900, 0, |id, ts| format!("{{\"id\":\"{id}\",\"ts\":{ts}}}"));
        assert_eq!(a.id, "c1|0000000");
        assert_eq!(b.id, "c1|0000001");
        assert!(b.ts > a.ts, "timestamps never go backwards");
        let r = c.append(1000, 5000, |_, _| "{}".into());
        assert_eq!(r.ts, 5000, "a reply is never earlier than its message");
        let (json, w) = c.activities_since(1, Page::ALL);
        assert_eq!(w, 3);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["activities"].as_array().unwrap().len(), 2);
        assert_eq!(v["watermark"], "3");
        let (json, _) = c.activities_since(3, Page::ALL);
        assert_eq!(json, r#"{"activities":[],"watermark":"3"}"#);
    }

    #[test]
    fn a_verified_token_is_remembered_until_it_expires() {
        let c = conv(10);
        let claims = |conversation: &str| {
            Arc::new(Claims {
                bot: "helpdesk".into(),
                conversation: conversation.into(),
                user: None,
                exp: 100,
                slot: 0,
                generation: 0,
                instance: String::new(),
                test_chat: false,
                until: 0,
                origins: Vec::new(),
            })
        };
        assert!(c.verified_token("dl1.a", 0).is_none());
        c.remember_token("dl1.other", claims("c2"));
        assert!(c.verified_token("dl1.other", 0).is_none(), "another conversation's token is not kept");
        c.remember_token("dl1.a", claims("c1"));
        assert_eq!(c.verified_token("dl1.a", 99).unwrap().exp, 100);
        assert!(c.verified_token("dl1.b", 99).is_none());
        assert!(c.verified_token("dl1.a", 100).is_none(), "expired");
    }

    #[test]
    fn retention_is_capped() {
        let c = conv(2);
        for _ in 0..5 {
            c.append(0, 0, |id, _| format!("\"{id}\""));
        }
        let (json, w) = c.activities_since(0, Page::ALL);
        assert_eq!(w, 5);
        assert_eq!(json, r#"{"activities":["c1|0000003","c1|0000004"],"watermark":"5"}"#);
    }

    #[test]
    fn retention_is_capped_in_bytes_and_keeps_the_newest() {
        let c = conv(100);
        {
            let mut log = c.lock();
            log.retention.bytes = 30;
        }
        // Each activity is 12 bytes ("c1|000000N" quoted): two fit in 30, a third does not.
        for _ in 0..5 {
            c.append(0, 0, |id, _| format!("\"{id}\""));
        }
        let (json, w) = c.activities_since(0, Page::ALL);
        assert_eq!(w, 5);
        assert_eq!(json, r#"{"activities":["c1|0000003","c1|0000004"],"watermark":"5"}"#);
        // One activity larger than the whole budget is still kept, alone.
        let big = "x".repeat(100);
        c.append(0, 0, |_, _| format!("\"{big}\""));
        let (json, w) = c.activities_since(0, Page::ALL);
        assert_eq!(w, 6);
        assert_eq!(json, format!(r#"{{"activities":["{big}"],"watermark":"6"}}"#));
        assert_eq!(c.lock().bytes, 102);
    }

    #[test]
    fn the_bot_counts_the_bytes_its_conversations_hold() {
        let c = conv(2);
        let control = c.bot.control.clone();
        c.append(0, 0, |_, _| "x".repeat(10));
        c.append(0, 0, |_, _| "y".repeat(20));
        assert_eq!(control.retained(), 30);
        c.append(0, 0, |_, _| "z".repeat(5)); // evicts the 10
        assert_eq!(control.retained(), 25);
        drop(c);
        assert_eq!(control.retained(), 0);
    }

    #[test]
    fn pages_bound_count_and_bytes_and_the_watermark_continues() {
        let c = conv(100);
        for _ in 0..5 {
            c.append(0, 0, |id, _| format!("\"{id}\""));
        }
        let two = Page { activities: 2, bytes: usize::MAX };
        let (json, w) = c.activities_since(0, two);
        assert_eq!((json.as_str(), w), (r#"{"activities":["c1|0000000","c1|0000001"],"watermark":"2"}"#, 2));
        let (json, w) = c.activities_since(w, two);
        assert_eq!((json.as_str(), w), (r#"{"activities":["c1|0000002","c1|0000003"],"watermark":"4"}"#, 4));
        let (json, w) = c.activities_since(w, two);
        assert_eq!((json.as_str(), w), (r#"{"activities":["c1|0000004"],"watermark":"5"}"#, 5));
        let (json, w) = c.activities_since(w, two);
        assert_eq!((json.as_str(), w), (r#"{"activities":[],"watermark":"5"}"#, 5));
        // By bytes: 12 bytes each; a 25-byte page takes two, a 5-byte page still takes one.
        let (_, w) = c.activities_since(0, Page { activities: 100, bytes: 25 });
        assert_eq!(w, 2);
        let (_, w) = c.activities_since(0, Page { activities: 100, bytes: 5 });
        assert_eq!(w, 1);
    }
}
