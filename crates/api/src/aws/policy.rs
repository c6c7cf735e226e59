//! IAM policy documents: parsing (bounded, every element checked, unsupported conditions
//! refused) and evaluation as AWS documents it.
