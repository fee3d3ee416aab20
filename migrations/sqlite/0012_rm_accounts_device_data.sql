-- What the app last said about its device (`account.device_data_changed`): the JSON of the
-- event's device data (model, os, app_version) and when it changed; NULL until the app says.
ALTER TABLE rm_accounts ADD COLUMN device_data TEXT;
ALTER TABLE rm_accounts ADD COLUMN device_data_at INTEGER;
