//! Persistence behind one trait, so that SQLite (the default, embedded) can be
//! joined by PostgreSQL when one machine is not enough.
//!
//! The model: every item a client syncs — room events, to-device messages,
//! account-data changes — gets a position in **one** stream (`StreamPos`). A sync
//! token is a position; "what is new since token N" is "every item above N that
//! this user may see". Writes are serialized by the single owner of the store
//! (the homeserver holds it behind one mutex), so positions are assigned and
//! committed in order and a reader never sees a gap fill in later.
//!
//! Each method is one database transaction: an event batch (a whole `createRoom`)
//! is either stored completely or not at all.

mod sqlite;

pub use sqlite::SqliteStore;

use serde_json::value::RawValue;

/// A position in the sync stream; 0 is "before everything".
pub type StreamPos = i64;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] rusqlite::Error),
    #[error("stored JSON is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone)]
pub struct UserRecord {
    pub user_id: String,
    pub password_hash: Option<String>,
    pub displayname: Option<String>,
    pub avatar_url: Option<String>,
}

/// A logged-in device: what an access token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
}

/// The client transaction an event was sent with (for idempotency and `unsigned.transaction_id`).
#[derive(Debug, Clone)]
pub struct TxnKey {
    pub device_id: String,
    pub txn_id: String,
}

/// An event about to be appended.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: String,
    pub origin_server_ts: u64,
    pub txn: Option<TxnKey>,
}

/// A stored room event.
#[derive(Debug, Clone)]
pub struct Event {
    pub pos: StreamPos,
    pub event_id: String,
    pub room_id: String,
    pub sender: String,
    pub kind: String,
    pub state_key: Option<String>,
    pub content: Box<RawValue>,
    /// For state events: the content of the state it replaced.
    pub prev_content: Option<Box<RawValue>>,
    pub origin_server_ts: u64,
    pub txn: Option<TxnKey>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Membership {
    Invite,
    Join,
    Leave,
    Ban,
    Knock,
}

impl Membership {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "invite" => Self::Invite,
            "join" => Self::Join,
            "leave" => Self::Leave,
            "ban" => Self::Ban,
            "knock" => Self::Knock,
            _ => return None,
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invite => "invite",
            Self::Join => "join",
            Self::Leave => "leave",
            Self::Ban => "ban",
            Self::Knock => "knock",
        }
    }
}

/// A user's latest membership in a room and the position of that member event.
#[derive(Debug, Clone)]
pub struct RoomMembership {
    pub room_id: String,
    pub membership: Membership,
    pub pos: StreamPos,
}

#[derive(Debug, Clone)]
pub struct ToDeviceMessage {
    pub pos: StreamPos,
    pub sender: String,
    pub kind: String,
    pub content: Box<RawValue>,
}

/// One to-device message to store: the target device and what it gets.
#[derive(Debug, Clone)]
pub struct NewToDevice {
    pub user_id: String,
    pub device_id: String,
    pub content: String,
}

#[derive(Debug, Clone)]
pub struct AccountData {
    pub room_id: Option<String>,
    pub kind: String,
    pub content: Box<RawValue>,
}

/// The storage interface of the homeserver. All methods are synchronous and
/// short; the owner calls them from a blocking-friendly context.
pub trait Store: Send {
    /// The highest position handed out so far.
    fn current_pos(&self) -> StreamPos;

    // Users and sessions.
    /// Creates a user; returns `false` if the id is taken.
    fn create_user(&mut self, user: &UserRecord) -> StoreResult<bool>;
    fn user(&self, user_id: &str) -> StoreResult<Option<UserRecord>>;
    fn set_profile(&mut self, user_id: &str, displayname: Option<&str>, avatar_url: Option<&str>) -> StoreResult<()>;
    /// Stores a session; a device id reused by the same user replaces that device's old token.
    fn create_session(&mut self, session: &Session, token_hash: &[u8], display_name: Option<&str>) -> StoreResult<()>;
    fn session(&self, token_hash: &[u8]) -> StoreResult<Option<Session>>;
    /// Ends a session and drops messages queued for its device.
    fn delete_session(&mut self, token_hash: &[u8]) -> StoreResult<()>;
    fn delete_all_sessions(&mut self, user_id: &str) -> StoreResult<()>;
    fn devices(&self, user_id: &str) -> StoreResult<Vec<String>>;

    // Room events.
    /// Appends events in order, updating room state and memberships; all or nothing.
    fn append(&mut self, events: Vec<NewEvent>) -> StoreResult<Vec<Event>>;
    /// The event id a (user, device, transaction id) was already answered with.
    fn txn_event(&self, user_id: &str, device_id: &str, txn_id: &str) -> StoreResult<Option<String>>;
    fn event(&self, event_id: &str) -> StoreResult<Option<Event>>;
    /// Current state of a room (empty for an unknown room).
    fn state(&self, room_id: &str) -> StoreResult<Vec<Event>>;
    fn state_event(&self, room_id: &str, kind: &str, state_key: &str) -> StoreResult<Option<Event>>;
    /// Current-state events whose position is in `(after, before)`.
    fn state_changes(&self, room_id: &str, after: StreamPos, before: StreamPos) -> StoreResult<Vec<Event>>;
    /// Up to `limit` events of a room with positions in `(after, upto]`, newest first.
    fn events_desc(&self, room_id: &str, after: StreamPos, upto: StreamPos, limit: usize) -> StoreResult<Vec<Event>>;
    /// Up to `limit` events of a room with positions in `(after, upto]`, oldest first.
    fn events_asc(&self, room_id: &str, after: StreamPos, upto: StreamPos, limit: usize) -> StoreResult<Vec<Event>>;
    fn membership(&self, room_id: &str, user_id: &str) -> StoreResult<Option<RoomMembership>>;
    /// Every room the user has a membership in.
    fn memberships_of(&self, user_id: &str) -> StoreResult<Vec<RoomMembership>>;

    // To-device messages.
    /// Queues messages of one `sendToDevice` transaction; returns `false` (storing
    /// nothing) if that transaction was already processed.
    fn put_to_device(
        &mut self,
        sender: &Session,
        txn_id: &str,
        kind: &str,
        messages: Vec<NewToDevice>,
    ) -> StoreResult<bool>;
    /// Messages queued for a device with positions in `(after, upto]`, oldest first.
    fn to_device(
        &self,
        session: &Session,
        after: StreamPos,
        upto: StreamPos,
        limit: usize,
    ) -> StoreResult<Vec<ToDeviceMessage>>;
    /// Deletes messages the device has acknowledged (positions `<= upto`).
    fn ack_to_device(&mut self, session: &Session, upto: StreamPos) -> StoreResult<()>;

    // Account data and filters.
    fn set_account_data(
        &mut self,
        user_id: &str,
        room_id: Option<&str>,
        kind: &str,
        content: &str,
    ) -> StoreResult<StreamPos>;
    fn account_data(&self, user_id: &str, room_id: Option<&str>, kind: &str) -> StoreResult<Option<Box<RawValue>>>;
    /// Account data changed in `(after, upto]`.
    fn account_data_changes(&self, user_id: &str, after: StreamPos, upto: StreamPos) -> StoreResult<Vec<AccountData>>;
    fn create_filter(&mut self, user_id: &str, filter: &str) -> StoreResult<String>;
    fn filter(&self, user_id: &str, filter_id: &str) -> StoreResult<Option<String>>;
}
