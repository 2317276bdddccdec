"""The MLflow registry: where MLflow writes (`store`), registration (`register`), the promotion rule
(`champion`) and the lock that makes read-decide-move one step (`lock`)."""
