/* placeholder, replaced by the coordinator implementation */
int main(void) { return 1; }
