"""The long-running processes of a participant, each = library objects + config + admin app."""
