#include "reason.h"

static const struct {
  const char *word;
  uint8_t alert;
} table[PC_REASON_COUNT] = {
#define PC_REASON_ROW(name, w, a) [PC_REASON_##name] = {w, a},
    PC_REASON_TABLE(PC_REASON_ROW)
#undef PC_REASON_ROW
};

const char *pc_reason_word(pc_reason_t r) {
  return (unsigned)r < PC_REASON_COUNT ? table[r].word : "";
}

uint8_t pc_reason_alert(pc_reason_t r) {
  return (unsigned)r < PC_REASON_COUNT ? table[r].alert : 0;
}

int pc_reason_is_identity(pc_reason_t r) {
  switch (r) {
  case PC_REASON_NO_CERT:
  case PC_REASON_BAD_CHAIN:
  case PC_REASON_EXPIRED:
  case PC_REASON_NO_SPIFFE_ID:
  case PC_REASON_WRONG_TRUST_DOMAIN:
  case PC_REASON_NOT_ALLOWED: return 1;
  default: return 0;
  }
}
