//! The embedded SQLite store (bundled SQLite, no system library).
//!
//! WAL journal with `synchronous = NORMAL`: a committed transaction survives
//! the process being killed at any point (the commit is in the WAL before the
//! HTTP response is written); an operating-system crash may lose the last
//! transactions. Set `synchronous = FULL` via [`SqliteStore::open_with`] to
//! survive that as well, at the price of an fsync per write.

use super::*;
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::path::Path;

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE users (
    user_id TEXT PRIMARY KEY,
    password_hash TEXT,
    displayname TEXT,
    avatar_url TEXT
);
CREATE TABLE sessions (
    token_hash BLOB PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    display_name TEXT
);
CREATE INDEX sessions_by_device ON sessions (user_id, device_id);
CREATE TABLE events (
    pos INTEGER PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    room_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT,
    content TEXT NOT NULL,
    prev_content TEXT,
    origin_server_ts INTEGER NOT NULL,
    txn_device TEXT,
    txn_id TEXT
);
CREATE INDEX events_by_room ON events (room_id, pos);
CREATE TABLE txns (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
) WITHOUT ROWID;
CREATE TABLE current_state (
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    state_key TEXT NOT NULL,
    pos INTEGER NOT NULL,
    PRIMARY KEY (room_id, type, state_key)
) WITHOUT ROWID;
CREATE TABLE memberships (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    membership TEXT NOT NULL,
    pos INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id)
) WITHOUT ROWID;
CREATE TABLE to_device (
    pos INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    sender TEXT NOT NULL,
    type TEXT NOT NULL,
    content TEXT NOT NULL
);
CREATE INDEX to_device_by_target ON to_device (user_id, device_id, pos);
CREATE TABLE to_device_txns (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    txn_id TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, txn_id)
) WITHOUT ROWID;
CREATE TABLE account_data (
    user_id TEXT NOT NULL,
    room_id TEXT NOT NULL,
    type TEXT NOT NULL,
    content TEXT NOT NULL,
    pos INTEGER NOT NULL,
    PRIMARY KEY (user_id, room_id, type)
) WITHOUT ROWID;
CREATE TABLE filters (
    user_id TEXT NOT NULL,
    filter_id INTEGER NOT NULL,
    filter TEXT NOT NULL,
    PRIMARY KEY (user_id, filter_id)
) WITHOUT ROWID;
";

/// SQLite's durability setting for commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// Durable against process crashes (the default).
    Normal,
    /// Durable against operating-system crashes and power loss too.
    Full,
}

#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
    /// The last position handed out; positions are assigned by this owner only.
    pos: StreamPos,
}

const EVENT_COLUMNS: &str =
    "pos, event_id, room_id, sender, type, state_key, content, prev_content, origin_server_ts, txn_device, txn_id";

fn raw(text: String) -> StoreResult<Box<RawValue>> {
    Ok(RawValue::from_string(text)?)
}

fn event_from_row(row: &Row<'_>) -> rusqlite::Result<(Event, String, Option<String>)> {
    let txn_device: Option<String> = row.get(9)?;
    let txn_id: Option<String> = row.get(10)?;
    let txn = match (txn_device, txn_id) {
        (Some(device_id), Some(txn_id)) => Some(TxnKey { device_id, txn_id }),
        _ => None,
    };
    let event = Event {
        pos: row.get(0)?,
        event_id: row.get(1)?,
        room_id: row.get(2)?,
        sender: row.get(3)?,
        kind: row.get(4)?,
        state_key: row.get(5)?,
        // Filled in by `finish_event` (parsing JSON cannot happen inside the row closure).
        content: Box::default(),
        prev_content: None,
        origin_server_ts: row.get::<_, i64>(8)?.max(0) as u64,
        txn,
    };
    Ok((event, row.get(6)?, row.get(7)?))
}

fn finish_event((mut event, content, prev): (Event, String, Option<String>)) -> StoreResult<Event> {
    event.content = raw(content)?;
    event.prev_content = prev.map(raw).transpose()?;
    Ok(event)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file.
    pub fn open(path: &Path) -> StoreResult<Self> {
        Self::open_with(path, Synchronous::Normal)
    }

    pub fn open_with(path: &Path, synchronous: Synchronous) -> StoreResult<Self> {
        let conn = Connection::open(path)?;
        // One process owns the database: exclusive locking spares a file lock
        // (two fcntl calls) per transaction and the WAL's shared-memory index.
        conn.pragma_update(None, "locking_mode", "EXCLUSIVE")?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Keep query plans stable so rebinding a parameter never re-prepares a statement.
        conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        conn.pragma_update(
            None,
            "synchronous",
            match synchronous {
                Synchronous::Normal => "NORMAL",
                Synchronous::Full => "FULL",
            },
        )?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Every statement of this module stays prepared (the default cache holds 16).
        conn.set_prepared_statement_cache_capacity(64);
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version == 0 {
            conn.execute_batch(&format!(
                "BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            ))?;
        }
        let pos = conn.query_row(
            "SELECT MAX(
                (SELECT IFNULL(MAX(pos), 0) FROM events),
                (SELECT IFNULL(MAX(pos), 0) FROM to_device),
                (SELECT IFNULL(MAX(pos), 0) FROM account_data),
                (SELECT IFNULL(MAX(pos), 0) FROM memberships))",
            [],
            |r| r.get(0),
        )?;
        Ok(Self { conn, pos })
    }

    fn query_events(&self, sql: &str, params: impl rusqlite::Params) -> StoreResult<Vec<Event>> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let rows = stmt.query_map(params, event_from_row)?;
        rows.map(|row| finish_event(row?)).collect()
    }
}

impl Store for SqliteStore {
    fn current_pos(&self) -> StreamPos {
        self.pos
    }

    fn create_user(&mut self, user: &UserRecord) -> StoreResult<bool> {
        let inserted = self
            .conn
            .prepare_cached(
                "INSERT OR IGNORE INTO users (user_id, password_hash, displayname, avatar_url) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                user.user_id,
                user.password_hash,
                user.displayname,
                user.avatar_url
            ])?;
        Ok(inserted == 1)
    }

    fn user(&self, user_id: &str) -> StoreResult<Option<UserRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT user_id, password_hash, displayname, avatar_url FROM users WHERE user_id = ?1")?;
        Ok(stmt
            .query_row([user_id], |r| {
                Ok(UserRecord {
                    user_id: r.get(0)?,
                    password_hash: r.get(1)?,
                    displayname: r.get(2)?,
                    avatar_url: r.get(3)?,
                })
            })
            .optional()?)
    }

    fn set_profile(&mut self, user_id: &str, displayname: Option<&str>, avatar_url: Option<&str>) -> StoreResult<()> {
        self.conn
            .prepare_cached("UPDATE users SET displayname = ?2, avatar_url = ?3 WHERE user_id = ?1")?
            .execute(params![user_id, displayname, avatar_url])?;
        Ok(())
    }

    fn create_session(&mut self, session: &Session, token_hash: &[u8], display_name: Option<&str>) -> StoreResult<()> {
        let tx = self.conn.transaction()?;
        tx.prepare_cached("DELETE FROM sessions WHERE user_id = ?1 AND device_id = ?2")?
            .execute(params![session.user_id, session.device_id])?;
        tx.prepare_cached(
            "INSERT INTO sessions (token_hash, user_id, device_id, display_name) VALUES (?1, ?2, ?3, ?4)",
        )?
        .execute(params![token_hash, session.user_id, session.device_id, display_name])?;
        tx.commit()?;
        Ok(())
    }

    fn session(&self, token_hash: &[u8]) -> StoreResult<Option<Session>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT user_id, device_id FROM sessions WHERE token_hash = ?1")?;
        Ok(stmt
            .query_row([token_hash], |r| {
                Ok(Session {
                    user_id: r.get(0)?,
                    device_id: r.get(1)?,
                })
            })
            .optional()?)
    }

    fn delete_session(&mut self, token_hash: &[u8]) -> StoreResult<()> {
        let Some(session) = self.session(token_hash)? else {
            return Ok(());
        };
        let tx = self.conn.transaction()?;
        tx.prepare_cached("DELETE FROM sessions WHERE token_hash = ?1")?
            .execute([token_hash])?;
        tx.prepare_cached("DELETE FROM to_device WHERE user_id = ?1 AND device_id = ?2")?
            .execute(params![session.user_id, session.device_id])?;
        tx.commit()?;
        Ok(())
    }

    fn delete_all_sessions(&mut self, user_id: &str) -> StoreResult<()> {
        let tx = self.conn.transaction()?;
        tx.prepare_cached("DELETE FROM sessions WHERE user_id = ?1")?
            .execute([user_id])?;
        tx.prepare_cached("DELETE FROM to_device WHERE user_id = ?1")?
            .execute([user_id])?;
        tx.commit()?;
        Ok(())
    }

    fn devices(&self, user_id: &str) -> StoreResult<Vec<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT device_id FROM sessions WHERE user_id = ?1 ORDER BY device_id")?;
        let rows = stmt.query_map([user_id], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn append(&mut self, events: Vec<NewEvent>) -> StoreResult<Vec<Event>> {
        let mut pos = self.pos;
        let tx = self.conn.transaction()?;
        let mut stored = Vec::with_capacity(events.len());
        for ev in events {
            pos += 1;
            let mut prev_content: Option<String> = None;
            if let Some(state_key) = &ev.state_key {
                prev_content = tx
                    .query_row(
                        "SELECT e.content FROM current_state s JOIN events e ON e.pos = s.pos
                         WHERE s.room_id = ?1 AND s.type = ?2 AND s.state_key = ?3",
                        params![ev.room_id, ev.kind, state_key],
                        |r| r.get(0),
                    )
                    .optional()?;
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO current_state (room_id, type, state_key, pos) VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![ev.room_id, ev.kind, state_key, pos])?;
                if ev.kind == "m.room.member" {
                    let membership = serde_json::from_str::<serde_json::Value>(&ev.content)?
                        .get("membership")
                        .and_then(|m| m.as_str())
                        .and_then(Membership::parse)
                        .unwrap_or(Membership::Leave);
                    tx.prepare_cached("INSERT OR REPLACE INTO memberships (user_id, room_id, membership, pos) VALUES (?1, ?2, ?3, ?4)")?.execute(params![state_key, ev.room_id, membership.as_str(), pos],
                    )?;
                }
            }
            tx.prepare_cached(&format!(
                "INSERT INTO events ({EVENT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"
            ))?
            .execute(params![
                pos,
                ev.event_id,
                ev.room_id,
                ev.sender,
                ev.kind,
                ev.state_key,
                ev.content,
                prev_content,
                ev.origin_server_ts as i64,
                ev.txn.as_ref().map(|t| &t.device_id),
                ev.txn.as_ref().map(|t| &t.txn_id),
            ])?;
            if let Some(txn) = &ev.txn {
                tx.prepare_cached("INSERT INTO txns (user_id, device_id, txn_id, event_id) VALUES (?1, ?2, ?3, ?4)")?
                    .execute(params![ev.sender, txn.device_id, txn.txn_id, ev.event_id])?;
            }
            stored.push(Event {
                pos,
                content: raw(ev.content)?,
                prev_content: prev_content.map(raw).transpose()?,
                event_id: ev.event_id,
                room_id: ev.room_id,
                sender: ev.sender,
                kind: ev.kind,
                state_key: ev.state_key,
                origin_server_ts: ev.origin_server_ts,
                txn: ev.txn,
            });
        }
        tx.commit()?;
        self.pos = pos;
        Ok(stored)
    }

    fn txn_event(&self, user_id: &str, device_id: &str, txn_id: &str) -> StoreResult<Option<String>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT event_id FROM txns WHERE user_id = ?1 AND device_id = ?2 AND txn_id = ?3")?;
        Ok(stmt
            .query_row(params![user_id, device_id, txn_id], |r| r.get(0))
            .optional()?)
    }

    fn event(&self, event_id: &str) -> StoreResult<Option<Event>> {
        Ok(self
            .query_events(
                &format!("SELECT {EVENT_COLUMNS} FROM events WHERE event_id = ?1"),
                [event_id],
            )?
            .pop())
    }

    fn state(&self, room_id: &str) -> StoreResult<Vec<Event>> {
        self.query_events(
            &format!(
                "SELECT {} FROM current_state s JOIN events e ON e.pos = s.pos WHERE s.room_id = ?1 ORDER BY e.pos",
                EVENT_COLUMNS
                    .split(", ")
                    .map(|c| format!("e.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            [room_id],
        )
    }

    fn state_event(&self, room_id: &str, kind: &str, state_key: &str) -> StoreResult<Option<Event>> {
        Ok(self
            .query_events(
                &format!(
                    "SELECT {EVENT_COLUMNS} FROM events WHERE pos =
                     (SELECT pos FROM current_state WHERE room_id = ?1 AND type = ?2 AND state_key = ?3)"
                ),
                params![room_id, kind, state_key],
            )?
            .pop())
    }

    fn state_changes(&self, room_id: &str, after: StreamPos, before: StreamPos) -> StoreResult<Vec<Event>> {
        self.query_events(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE pos IN
                 (SELECT pos FROM current_state WHERE room_id = ?1 AND pos > ?2 AND pos < ?3) ORDER BY pos"
            ),
            params![room_id, after, before],
        )
    }

    fn events_desc(&self, room_id: &str, after: StreamPos, upto: StreamPos, limit: usize) -> StoreResult<Vec<Event>> {
        self.query_events(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3
                 ORDER BY pos DESC LIMIT ?4"
            ),
            params![room_id, after, upto, limit as i64],
        )
    }

    fn events_asc(&self, room_id: &str, after: StreamPos, upto: StreamPos, limit: usize) -> StoreResult<Vec<Event>> {
        self.query_events(
            &format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE room_id = ?1 AND pos > ?2 AND pos <= ?3
                 ORDER BY pos ASC LIMIT ?4"
            ),
            params![room_id, after, upto, limit as i64],
        )
    }

    fn membership(&self, room_id: &str, user_id: &str) -> StoreResult<Option<RoomMembership>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT room_id, membership, pos FROM memberships WHERE user_id = ?1 AND room_id = ?2")?;
        Ok(stmt
            .query_row(params![user_id, room_id], membership_from_row)
            .optional()?)
    }

    fn memberships_of(&self, user_id: &str) -> StoreResult<Vec<RoomMembership>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT room_id, membership, pos FROM memberships WHERE user_id = ?1 ORDER BY pos")?;
        let rows = stmt.query_map([user_id], membership_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn put_to_device(
        &mut self,
        sender: &Session,
        txn_id: &str,
        kind: &str,
        messages: Vec<NewToDevice>,
    ) -> StoreResult<bool> {
        let mut pos = self.pos;
        let tx = self.conn.transaction()?;
        let fresh = tx
            .prepare_cached("INSERT OR IGNORE INTO to_device_txns (user_id, device_id, txn_id) VALUES (?1, ?2, ?3)")?
            .execute(params![sender.user_id, sender.device_id, txn_id])?
            == 1;
        if !fresh {
            return Ok(false);
        }
        for msg in messages {
            pos += 1;
            tx.prepare_cached("INSERT INTO to_device (pos, user_id, device_id, sender, type, content) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?.execute(params![pos, msg.user_id, msg.device_id, sender.user_id, kind, msg.content],
            )?;
        }
        tx.commit()?;
        self.pos = pos;
        Ok(true)
    }

    fn to_device(
        &self,
        session: &Session,
        after: StreamPos,
        upto: StreamPos,
        limit: usize,
    ) -> StoreResult<Vec<ToDeviceMessage>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT pos, sender, type, content FROM to_device
             WHERE user_id = ?1 AND device_id = ?2 AND pos > ?3 AND pos <= ?4 ORDER BY pos LIMIT ?5",
        )?;
        let rows = stmt.query_map(
            params![session.user_id, session.device_id, after, upto, limit as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get::<_, String>(3)?)),
        )?;
        rows.map(|row| {
            let (pos, sender, kind, content) = row?;
            Ok(ToDeviceMessage {
                pos,
                sender,
                kind,
                content: raw(content)?,
            })
        })
        .collect()
    }

    fn ack_to_device(&mut self, session: &Session, upto: StreamPos) -> StoreResult<()> {
        self.conn
            .prepare_cached("DELETE FROM to_device WHERE user_id = ?1 AND device_id = ?2 AND pos <= ?3")?
            .execute(params![session.user_id, session.device_id, upto])?;
        Ok(())
    }

    fn set_account_data(
        &mut self,
        user_id: &str,
        room_id: Option<&str>,
        kind: &str,
        content: &str,
    ) -> StoreResult<StreamPos> {
        let pos = self.pos + 1;
        self.conn.prepare_cached("INSERT OR REPLACE INTO account_data (user_id, room_id, type, content, pos) VALUES (?1, ?2, ?3, ?4, ?5)")?.execute(params![user_id, room_id.unwrap_or(""), kind, content, pos],
        )?;
        self.pos = pos;
        Ok(pos)
    }

    fn account_data(&self, user_id: &str, room_id: Option<&str>, kind: &str) -> StoreResult<Option<Box<RawValue>>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT content FROM account_data WHERE user_id = ?1 AND room_id = ?2 AND type = ?3")?;
        let content: Option<String> = stmt
            .query_row(params![user_id, room_id.unwrap_or(""), kind], |r| r.get(0))
            .optional()?;
        content.map(raw).transpose()
    }

    fn account_data_changes(&self, user_id: &str, after: StreamPos, upto: StreamPos) -> StoreResult<Vec<AccountData>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT room_id, type, content FROM account_data WHERE user_id = ?1 AND pos > ?2 AND pos <= ?3 ORDER BY pos",
        )?;
        let rows = stmt.query_map(params![user_id, after, upto], |r| {
            Ok((r.get::<_, String>(0)?, r.get(1)?, r.get::<_, String>(2)?))
        })?;
        rows.map(|row| {
            let (room_id, kind, content) = row?;
            Ok(AccountData {
                room_id: (!room_id.is_empty()).then_some(room_id),
                kind,
                content: raw(content)?,
            })
        })
        .collect()
    }

    fn create_filter(&mut self, user_id: &str, filter: &str) -> StoreResult<String> {
        let tx = self.conn.transaction()?;
        let id: i64 = tx.query_row(
            "SELECT IFNULL(MAX(filter_id), -1) + 1 FROM filters WHERE user_id = ?1",
            [user_id],
            |r| r.get(0),
        )?;
        tx.prepare_cached("INSERT INTO filters (user_id, filter_id, filter) VALUES (?1, ?2, ?3)")?
            .execute(params![user_id, id, filter])?;
        tx.commit()?;
        Ok(id.to_string())
    }

    fn filter(&self, user_id: &str, filter_id: &str) -> StoreResult<Option<String>> {
        let Ok(id) = filter_id.parse::<i64>() else {
            return Ok(None);
        };
        let mut stmt = self
            .conn
            .prepare_cached("SELECT filter FROM filters WHERE user_id = ?1 AND filter_id = ?2")?;
        Ok(stmt.query_row(params![user_id, id], |r| r.get(0)).optional()?)
    }
}

fn membership_from_row(r: &Row<'_>) -> rusqlite::Result<RoomMembership> {
    let membership: String = r.get(1)?;
    Ok(RoomMembership {
        room_id: r.get(0)?,
        membership: Membership::parse(&membership).unwrap_or(Membership::Leave),
        pos: r.get(2)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(room: &str, user: &str, membership: &str) -> NewEvent {
        NewEvent {
            event_id: crate::ids::new_event_id(),
            room_id: room.into(),
            sender: user.into(),
            kind: "m.room.member".into(),
            state_key: Some(user.into()),
            content: format!(r#"{{"membership":"{membership}"}}"#),
            origin_server_ts: 1,
            txn: None,
        }
    }

    #[test]
    fn state_memberships_and_positions_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db.sqlite");
        {
            let mut store = SqliteStore::open(&path).expect("open");
            let stored = store
                .append(vec![
                    member("!r:hs", "@a:hs", "join"),
                    member("!r:hs", "@a:hs", "leave"),
                ])
                .expect("append");
            assert_eq!(
                stored[1].prev_content.as_ref().map(|c| c.get()),
                Some(r#"{"membership":"join"}"#)
            );
            assert_eq!(store.current_pos(), 2);
            let session = Session {
                user_id: "@a:hs".into(),
                device_id: "D".into(),
            };
            assert!(
                store
                    .put_to_device(
                        &session,
                        "t1",
                        "x",
                        vec![NewToDevice {
                            user_id: "@a:hs".into(),
                            device_id: "D".into(),
                            content: "{}".into()
                        }]
                    )
                    .expect("put")
            );
            assert!(!store.put_to_device(&session, "t1", "x", vec![]).expect("put again"));
        }
        let store = SqliteStore::open(&path).expect("reopen");
        assert_eq!(store.current_pos(), 3);
        let m = store.membership("!r:hs", "@a:hs").expect("membership").expect("some");
        assert_eq!((m.membership, m.pos), (Membership::Leave, 2));
        assert_eq!(store.state("!r:hs").expect("state").len(), 1);
        assert_eq!(store.events_desc("!r:hs", 0, 10, 10).expect("events").len(), 2);
        let session = Session {
            user_id: "@a:hs".into(),
            device_id: "D".into(),
        };
        assert_eq!(store.to_device(&session, 0, 3, 10).expect("to-device").len(), 1);
    }

    #[test]
    fn failed_batch_writes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = SqliteStore::open(&dir.path().join("db.sqlite")).expect("open");
        let first = member("!r:hs", "@a:hs", "join");
        let mut dup = member("!r:hs", "@b:hs", "join");
        dup.event_id = first.event_id.clone();
        assert!(store.append(vec![first, dup]).is_err());
        assert_eq!(store.current_pos(), 0);
        assert!(store.state("!r:hs").expect("state").is_empty());
        assert!(store.membership("!r:hs", "@a:hs").expect("membership").is_none());
    }
}
