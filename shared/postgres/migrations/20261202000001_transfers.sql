-- Transfers: a movement may be a transfer's debit, credit or refund, naming the
-- transfer and the other account.

ALTER TABLE transactions DROP CONSTRAINT IF EXISTS transactions_kind_check;
ALTER TABLE transactions ADD CONSTRAINT transactions_kind_check
    CHECK (kind IN ('deposit', 'withdrawal', 'transfer-in', 'transfer-out', 'transfer-refund'));
ALTER TABLE transactions ADD COLUMN transfer TEXT, ADD COLUMN counterparty TEXT;
ALTER TABLE transactions ADD CONSTRAINT transactions_transfer_check
    CHECK ((transfer IS NULL) = (counterparty IS NULL));
