-- The SFS asks whether an app instance was enrolled at any server before it registers the
-- app instance's first PIN (nothing is written for an app instance nobody enrolled).
CREATE INDEX rm_accounts_by_app_instance ON rm_accounts (app_instance);
