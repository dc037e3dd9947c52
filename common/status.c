/* status.c - names of the SBN_E* status codes. */
#include "sbn/status.h"

SBN_API const char *sbn_strerror(int status) {
  switch (status) {
  case SBN_OK: return "success";
  case SBN_EINVAL: return "invalid argument";
  case SBN_ENOMEM: return "out of memory";
  case SBN_EIO: return "i/o error";
  case SBN_ETIMEDOUT: return "timed out";
  case SBN_ECONNECT: return "cannot connect to coordinator";
  case SBN_EPROTO: return "protocol error";
  case SBN_EVERSION: return "protocol version mismatch";
  case SBN_EREJECTED: return "rejected by coordinator";
  case SBN_EPEERLOST: return "group member lost";
  case SBN_EMISMATCH: return "ranks disagree";
  case SBN_ECLOSED: return "not connected";
  case SBN_ETOOBIG: return "too big";
  case SBN_ESHUTDOWN: return "coordinator shutting down";
  case SBN_ENOTMEMBER: return "not a member of the group";
  case SBN_ESTATE: return "invalid state for this call";
  case SBN_EAUTH: return "authentication failed";
  case SBN_EBADSTATS: return "invalid statistics";
  case SBN_ELIMIT: return "resource limit reached";
  case SBN_EKEY: return "bad state_dict keys";
  case SBN_ESHAPE: return "bad tensor shape";
  case SBN_EDUPLICATE: return "rank already connected";
  default: return "unknown status";
  }
}
