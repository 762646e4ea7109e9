//! The billed-session rules of one conversation: when a session begins, continues and ends.

use crate::clock::Millis;

/// The rules, from `[metering]`.
#[derive(Debug, Clone, Copy)]
pub struct SessionRules {
    /// A session ends after this long without a user message.
    pub idle_ms: i64,
    /// A session ends this long after it began.
    pub max_ms: i64,
    /// A session ends after this many turns.
    pub max_turns: u32,
}

/// The session state of one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionState {
    open: bool,
    began_ms: Millis,
    last_ms: Millis,
    turns: u32,
    /// The open session began and is not recorded yet (or its upstream bot has not accepted
    /// its first turn): whether it counts is not known.
    pending: bool,
    /// How many sessions this conversation began (names the next session id).
    pub ordinal: u32,
}

/// What a user turn does to billing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The turn belongs to the open session.
    Continue,
    /// The turn begins a new billed session (the state is updated only by [`SessionState::begin`]).
    Begin,
    /// No session is open and this turn does not begin one (a system topic).
    Nothing,
    /// A session began and is not recorded yet: wait until it is settled, then decide again
    /// (if it is undone, this turn may begin one itself; a turn never continues a session that
    /// is then not billed).
    Wait,
}

impl SessionState {
    /// Decides a user turn at `now`. `user_topic` says whether the turn triggers a user topic
    /// (built-in bots) or is a user message (upstream bots). Closes a session that ended by the
    /// idle, duration or turn rule first; a continuing turn is counted here.
    pub fn decide(&mut self, rules: &SessionRules, now: Millis, user_topic: bool) -> Decision {
        if self.pending {
            return Decision::Wait;
        }
        if self.open
            && (now - self.last_ms >= rules.idle_ms
                || now - self.began_ms >= rules.max_ms
                || self.turns >= rules.max_turns)
        {
            self.open = false;
        }
        if self.open {
            self.turns += 1;
            self.last_ms = now;
            return Decision::Continue;
        }
        if user_topic { Decision::Begin } else { Decision::Nothing }
    }

    /// Opens a session at `now` (its first turn counted), pending until
    /// [`settle`](Self::settle)d or [`abort`](Self::abort)ed; returns its ordinal.
    pub fn begin(&mut self, now: Millis) -> u32 {
        self.open = true;
        self.pending = true;
        self.began_ms = now;
        self.last_ms = now;
        self.turns = 1;
        self.ordinal += 1;
        self.ordinal
    }

    /// Undoes the [`begin`](Self::begin) of session `ordinal`, which will not be billed: closes
    /// it if it is still the open one. The ordinal is not taken back (a later session may have
    /// begun meanwhile); ids only need to be unique, not dense.
    pub fn abort(&mut self, ordinal: u32) {
        if self.ordinal == ordinal {
            self.open = false;
            self.pending = false;
        }
    }

    /// Session `ordinal` is recorded: later turns continue it.
    pub fn settle(&mut self, ordinal: u32) {
        if self.ordinal == ordinal {
            self.pending = false;
        }
    }

    /// Ends the open session (the user or the bot ended the conversation).
    pub fn end(&mut self) {
        self.open = false;
    }

    /// Whether a session is open.
    pub fn is_open(&self) -> bool {
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: SessionRules = SessionRules { idle_ms: 30 * 60_000, max_ms: 60 * 60_000, max_turns: 100 };

    fn begin(s: &mut SessionState, now: Millis) {
        assert_eq!(s.decide(&RULES, now, true), Decision::Begin);
        let n = s.begin(now);
        s.settle(n);
    }

    #[test]
    fn a_pending_session_makes_later_turns_wait_for_its_outcome() {
        let mut s = SessionState::default();
        assert_eq!(s.decide(&RULES, 0, true), Decision::Begin);
        let n = s.begin(0);
        assert_eq!(s.decide(&RULES, 1, true), Decision::Wait);
        assert_eq!(s.decide(&RULES, 1, false), Decision::Wait);
        s.abort(n);
        assert_eq!(s.decide(&RULES, 2, true), Decision::Begin, "undone: the waiting turn begins its own");
        let m = s.begin(2);
        s.settle(m);
        assert_eq!(s.decide(&RULES, 3, true), Decision::Continue);
    }

    #[test]
    fn system_topics_begin_nothing() {
        let mut s = SessionState::default();
        assert_eq!(s.decide(&RULES, 0, false), Decision::Nothing);
        begin(&mut s, 1);
        assert_eq!(
            s.decide(&RULES, 2, false),
            Decision::Continue,
            "a system topic inside a session is a turn"
        );
    }

    #[test]
    fn the_101st_turn_begins_a_new_session() {
        let mut s = SessionState::default();
        begin(&mut s, 0);
        for i in 2..=100 {
            assert_eq!(s.decide(&RULES, i, true), Decision::Continue, "turn {i}");
        }
        assert_eq!(s.decide(&RULES, 101, true), Decision::Begin);
    }

    #[test]
    fn the_61st_minute_begins_a_new_session() {
        let mut s = SessionState::default();
        begin(&mut s, 0);
        for minute in (20..60).step_by(20) {
            assert_eq!(s.decide(&RULES, minute * 60_000, true), Decision::Continue);
        }
        assert_eq!(s.decide(&RULES, 59 * 60_000 + 59_999, true), Decision::Continue);
        assert_eq!(s.decide(&RULES, 60 * 60_000, true), Decision::Begin);
    }

    #[test]
    fn thirty_idle_minutes_end_it() {
        let mut s = SessionState::default();
        begin(&mut s, 0);
        assert_eq!(s.decide(&RULES, 29 * 60_000, true), Decision::Continue);
        assert_eq!(s.decide(&RULES, 59 * 60_000, true), Decision::Begin);
    }

    #[test]
    fn ending_closes_and_abort_undoes() {
        let mut s = SessionState::default();
        begin(&mut s, 0);
        s.end();
        assert_eq!(s.decide(&RULES, 1, true), Decision::Begin);
        let second = s.begin(1);
        assert_eq!(second, 2);
        s.abort(second);
        assert!(!s.is_open());
        let third = s.begin(2);
        assert_eq!(third, 3, "the next session takes a new ordinal");
        s.settle(third);
        s.abort(second);
        assert!(s.is_open(), "undoing an older session leaves a newer one open");
    }
}
