//! Authorization rules for a single server: who may send what into a room.
//!
//! A subset of the room-version authorization rules
//! (<https://spec.matrix.org/v1.13/rooms/v10/#authorization-rules>) that matters
//! when every member is local: membership transitions and power levels.

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// The `m.room.power_levels` content, with the spec's defaults for absent fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct PowerLevels {
    pub users: BTreeMap<String, i64>,
    pub users_default: i64,
    pub events: BTreeMap<String, i64>,
    pub events_default: i64,
    pub state_default: i64,
    pub ban: i64,
    pub kick: i64,
    pub redact: i64,
    pub invite: i64,
}

impl Default for PowerLevels {
    fn default() -> Self {
        Self {
            users: BTreeMap::new(),
            users_default: 0,
            events: BTreeMap::new(),
            events_default: 0,
            state_default: 50,
            ban: 50,
            kick: 50,
            redact: 50,
            invite: 0,
        }
    }
}

impl PowerLevels {
    /// Parses power levels leniently: numbers given as strings are accepted, as
    /// older clients send them; anything unusable falls back to the default.
    pub fn from_content(content: &Value) -> Self {
        let mut normalized = content.clone();
        normalize_numbers(&mut normalized);
        serde_json::from_value(normalized).unwrap_or_default()
    }

    pub fn user_level(&self, user_id: &str) -> i64 {
        self.users.get(user_id).copied().unwrap_or(self.users_default)
    }

    /// The level needed to send an event of `kind`.
    pub fn event_level(&self, kind: &str, is_state: bool) -> i64 {
        self.events.get(kind).copied().unwrap_or(if is_state {
            self.state_default
        } else {
            self.events_default
        })
    }

    pub fn may_send(&self, user_id: &str, kind: &str, is_state: bool) -> bool {
        self.user_level(user_id) >= self.event_level(kind, is_state)
    }
}

fn normalize_numbers(value: &mut Value) {
    match value {
        Value::String(s) => {
            if let Ok(n) = s.trim().parse::<i64>() {
                *value = Value::from(n);
            }
        }
        Value::Object(map) => map.values_mut().for_each(normalize_numbers),
        _ => {}
    }
}

/// The default power levels of a new room (the values Synapse uses).
pub fn default_power_levels(creator: &str, extra_admins: &[String]) -> Value {
    let mut users = serde_json::Map::new();
    users.insert(creator.to_string(), Value::from(100));
    for admin in extra_admins {
        users.insert(admin.clone(), Value::from(100));
    }
    serde_json::json!({
        "users": users,
        "users_default": 0,
        "events": {
            "m.room.name": 50,
            "m.room.power_levels": 100,
            "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50,
            "m.room.avatar": 50,
            "m.room.tombstone": 100,
            "m.room.server_acl": 100,
            "m.room.encryption": 100
        },
        "events_default": 0,
        "state_default": 50,
        "ban": 50,
        "kick": 50,
        "redact": 50,
        "invite": 0,
        "historical": 100,
        "notifications": { "room": 50 }
    })
}

/// Checks a change of power levels by `user_id` (auth rule 10 of room v10):
/// every changed level must be at most the sender's own, and the sender may not
/// change the level of another user at or above its own.
pub fn check_power_levels_change(old: &PowerLevels, new: &PowerLevels, user_id: &str) -> Result<(), String> {
    let own = old.user_level(user_id);
    let scalar = |name: &str, a: i64, b: i64| -> Result<(), String> {
        if a != b && (a > own || b > own) {
            Err(format!(
                "You may not change '{name}' beyond your own power level ({own})"
            ))
        } else {
            Ok(())
        }
    };
    scalar("users_default", old.users_default, new.users_default)?;
    scalar("events_default", old.events_default, new.events_default)?;
    scalar("state_default", old.state_default, new.state_default)?;
    scalar("ban", old.ban, new.ban)?;
    scalar("kick", old.kick, new.kick)?;
    scalar("redact", old.redact, new.redact)?;
    scalar("invite", old.invite, new.invite)?;
    for kind in old.events.keys().chain(new.events.keys()) {
        let (a, b) = (old.events.get(kind), new.events.get(kind));
        if a != b && (a.is_some_and(|&l| l > own) || b.is_some_and(|&l| l > own)) {
            return Err(format!(
                "You may not change the level of '{kind}' beyond your own ({own})"
            ));
        }
    }
    for user in old.users.keys().chain(new.users.keys()) {
        let (a, b) = (old.users.get(user), new.users.get(user));
        if a == b {
            continue;
        }
        if user != user_id && a.is_some_and(|&l| l >= own) {
            return Err(format!(
                "You may not change the level of {user}, who is at or above yours"
            ));
        }
        if b.is_some_and(|&l| l > own) {
            return Err(format!("You may not raise anyone above your own level ({own})"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn levels_and_defaults() {
        let pl = PowerLevels::from_content(&default_power_levels("@a:hs", &[]));
        assert!(pl.may_send("@a:hs", "m.room.power_levels", true));
        assert!(!pl.may_send("@b:hs", "m.room.name", true));
        assert!(!pl.may_send("@b:hs", "com.example.state", true));
        assert!(pl.may_send("@b:hs", "m.call.invite", false));
        let legacy = PowerLevels::from_content(&json!({"users": {"@b:hs": "50"}, "state_default": "50"}));
        assert_eq!(legacy.user_level("@b:hs"), 50);
        assert!(legacy.may_send("@b:hs", "m.room.topic", true));
    }

    #[test]
    fn power_level_changes() {
        let old = PowerLevels::from_content(&json!({"users": {"@admin:hs": 100, "@mod:hs": 50}}));
        let raise = |user: &str, level: i64| {
            let mut new = old.clone();
            new.users.insert(user.to_string(), level);
            new
        };
        assert!(check_power_levels_change(&old, &raise("@x:hs", 50), "@mod:hs").is_ok());
        assert!(check_power_levels_change(&old, &raise("@x:hs", 51), "@mod:hs").is_err());
        assert!(check_power_levels_change(&old, &raise("@admin:hs", 0), "@mod:hs").is_err());
        assert!(
            check_power_levels_change(&old, &raise("@mod:hs", 0), "@mod:hs").is_ok(),
            "demote yourself"
        );
        assert!(check_power_levels_change(&old, &raise("@mod:hs", 100), "@admin:hs").is_ok());
        let mut events = old.clone();
        events.events.insert("m.room.name".into(), 75);
        assert!(check_power_levels_change(&old, &events, "@mod:hs").is_err());
        assert!(check_power_levels_change(&old, &events, "@admin:hs").is_ok());
    }
}
