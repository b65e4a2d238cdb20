-- Owners: the subject that opened an account (NULL: opened before owners were
-- recorded, or with authentication off). Queries answer only the owner (or an
-- operator); anyone else is told the account does not exist.

ALTER TABLE accounts ADD COLUMN owner TEXT;
