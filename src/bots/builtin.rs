//! Built-in bots: topics with trigger phrases and replies, answered by the gateway itself.

use std::collections::HashMap;
use std::sync::Arc;

use super::flow::{Flow, TopicFlow};
use crate::config::{SystemTopic, TopicConfig, TopicKind};

/// One topic, with its trigger phrases normalized once at load.
#[derive(Debug, Clone)]
pub struct Topic {
    /// Display name.
    pub name: String,
    /// User (billed) or system.
    pub kind: TopicKind,
    /// The role of a system topic.
    pub system: Option<SystemTopic>,
    /// The replies, in order.
    pub replies: Vec<String>,
    /// The flow that fills the replies, if the topic has one (shared: a run outlives the request
    /// that triggered it).
    pub flow: Option<Arc<TopicFlow>>,
    /// Normalized phrases, each wrapped in spaces for whole-word matching.
    triggers: Vec<String>,
}

impl Topic {
    /// Whether this topic ends the conversation.
    pub fn ends_conversation(&self) -> bool {
        self.system == Some(SystemTopic::EndOfConversation)
    }
}

/// A bot defined by its topics.
#[derive(Debug, Clone)]
pub struct BuiltinBot {
    topics: Vec<Topic>,
    greeting: Option<usize>,
    fallback: usize,
    /// Trigger phrases by their first word: (topic, the phrase's words, its length). A message
    /// is matched with one map lookup per word, instead of a substring search per phrase (that
    /// search was 3% of a message's instructions).
    index: HashMap<String, Vec<(usize, Vec<String>, usize)>>,
    /// The reply to a message that carries files (`{{names}}`, `{{count}}`).
    attachment_reply: String,
}

impl BuiltinBot {
    /// Builds the bot from validated topics (validation guarantees one fallback).
    pub fn new(topics: &[TopicConfig]) -> Self {
        let topics: Vec<Topic> = topics
            .iter()
            .map(|t| Topic {
                name: t.name.clone(),
                kind: t.kind,
                system: t.system,
                replies: t.replies.clone(),
                flow: t.flow.as_ref().map(|f| {
                    Arc::new(TopicFlow {
                        flow: Flow::new(f),
                        replies: t.replies.clone(),
                        fallback_reply: t.fallback_reply.clone().unwrap_or_default(),
                    })
                }),
                triggers: t.triggers.iter().map(|p| normalize(p)).collect(),
            })
            .collect();
        let find = |role| topics.iter().position(|t| t.system == Some(role));
        let greeting = find(SystemTopic::Greeting);
        let fallback = find(SystemTopic::Fallback).unwrap_or(0);
        let mut index: HashMap<String, Vec<(usize, Vec<String>, usize)>> = HashMap::new();
        for (i, t) in topics.iter().enumerate() {
            for p in &t.triggers {
                let words: Vec<String> = p.split_whitespace().map(str::to_string).collect();
                if let Some(first) = words.first() {
                    index.entry(first.clone()).or_default().push((i, words[1..].to_vec(), p.len()));
                }
            }
        }
        let attachment_reply = crate::config::DEFAULT_ATTACHMENT_REPLY.to_string();
        Self { topics, greeting, fallback, index, attachment_reply }
    }

    /// The bot with its own reply to files, if it names one.
    pub fn with_attachment_reply(mut self, reply: Option<&str>) -> Self {
        if let Some(r) = reply {
            self.attachment_reply = r.to_string();
        }
        self
    }

    /// The acknowledgement of files named `names`.
    pub fn attachment_reply(&self, names: &[&str]) -> String {
        self.attachment_reply
            .replace("{{names}}", &names.join(", "))
            .replace("{{count}}", &names.len().to_string())
    }

    /// The topics.
    pub fn topics(&self) -> &[Topic] {
        &self.topics
    }

    /// The greeting topic, if the bot has one.
    pub fn greeting(&self) -> Option<&Topic> {
        self.greeting.map(|i| &self.topics[i])
    }

    /// The topic a user message triggers: the one with the longest trigger phrase contained in
    /// the message (whole words, ignoring case and punctuation), earlier topics winning ties;
    /// the fallback when none matches.
    pub fn classify(&self, text: &str) -> &Topic {
        let text = normalize(text);
        let words: Vec<&str> = text.split_whitespace().collect();
        // (topic, phrase length): the longest phrase wins, then the earlier topic.
        let mut best: Option<(usize, usize)> = None;
        for (at, w) in words.iter().enumerate() {
            let Some(candidates) = self.index.get(*w) else { continue };
            for (topic, rest, len) in candidates {
                let follows = words.len() > at + rest.len()
                    && rest.iter().zip(&words[at + 1..]).all(|(a, b)| a.as_str() == *b);
                let better = best.is_none_or(|(t, l)| *len > l || (*len == l && *topic < t));
                if follows && better {
                    best = Some((*topic, *len));
                }
            }
        }
        &self.topics[best.map_or(self.fallback, |(i, _)| i)]
    }
}

/// Lower-cases letters and digits, keeps apostrophes, turns everything else into single
/// spaces, and wraps the result in spaces so `" vpn "` matches whole words only.
fn normalize(s: &str) -> String {
    if s.is_ascii() {
        // Most messages are ASCII: the same, byte by byte, without decoding characters or
        // Unicode case tables (a third of the classification's instructions).
        let mut out = Vec::with_capacity(s.len() + 2);
        out.push(b' ');
        for &b in s.as_bytes() {
            if b.is_ascii_alphanumeric() || b == b'\'' {
                out.push(b.to_ascii_lowercase());
            } else if out.last() != Some(&b' ') {
                out.push(b' ');
            }
        }
        if out.last() != Some(&b' ') {
            out.push(b' ');
        }
        return String::from_utf8(out).unwrap_or_default();
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push(' ');
    for c in s.chars() {
        if c.is_alphanumeric() || c == '\'' {
            out.extend(c.to_lowercase());
        } else if !out.ends_with(' ') {
            out.push(' ');
        }
    }
    if !out.ends_with(' ') {
        out.push(' ');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn helpdesk() -> BuiltinBot {
        let c = Config::embedded_default().unwrap();
        let b = c.bots.iter().find(|b| b.id == "helpdesk").unwrap();
        BuiltinBot::new(&b.topics)
    }

    #[test]
    fn ascii_and_unicode_normalize_alike() {
        for s in
            ["I forgot my PASSWORD!", "  vpn?? ok  ", "it's", "", "a\tb\nc", "x--y", "ÉTÉ vpn", "naïve Café"]
        {
            let slow: String = {
                let mut out = String::from(" ");
                for c in s.chars() {
                    if c.is_alphanumeric() || c == '\'' {
                        out.extend(c.to_lowercase());
                    } else if !out.ends_with(' ') {
                        out.push(' ');
                    }
                }
                if !out.ends_with(' ') {
                    out.push(' ');
                }
                out
            };
            assert_eq!(normalize(s), slow, "{s:?}");
        }
    }

    #[test]
    fn matches_whole_words_ignoring_case_and_punctuation() {
        let bot = helpdesk();
        assert_eq!(bot.classify("I forgot my PASSWORD!").name, "Reset password");
        assert_eq!(bot.classify("vpn?").name, "VPN");
        assert_eq!(bot.classify("openvpn").name, "Fallback");
        assert_eq!(bot.classify("").name, "Fallback");
    }

    #[test]
    fn system_topics_are_marked() {
        let bot = helpdesk();
        let bye = bot.classify("ok bye");
        assert_eq!(bye.kind, TopicKind::System);
        assert!(bye.ends_conversation());
        assert_eq!(bot.classify("talk to a human").system, Some(SystemTopic::Escalate));
        assert_eq!(bot.greeting().unwrap().kind, TopicKind::System);
        assert_eq!(bot.classify("hours please").kind, TopicKind::User);
    }

    #[test]
    fn longest_phrase_wins() {
        let bot = helpdesk();
        // "remote access" (VPN) is longer than "open" (Opening hours).
        assert_eq!(bot.classify("is remote access open").name, "VPN");
    }
}
