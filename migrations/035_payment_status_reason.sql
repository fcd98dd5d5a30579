-- Why a payment ended as it did (e.g. the provider's cancellation reason).
ALTER TABLE public.payments ADD COLUMN IF NOT EXISTS status_reason text;
